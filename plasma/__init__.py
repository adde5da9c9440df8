"""Plasma: adapt quantized ONNX policies on edge devices with signed LoRA packets learned from
world models.

- ``plasma.protocol``: the contract both sides share (messages, packets, telemetry, signing,
  topics, the bus seam, bundles, errors).
- ``plasma.edge``: the device runtime and daemon (light: no server code, no onnx, no training).
- ``plasma.server``: the adaptation stages and the publisher.
"""
