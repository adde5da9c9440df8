"""Operator tools beside the stages: the one-command demo, the embedded broker it falls back to,
and the packet/telemetry fuzzer."""

__all__: list[str] = []
