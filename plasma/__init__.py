"""Plasma: adapt quantized ONNX policies on edge devices with signed LoRA packets learned from
world models.

- ``plasma.PlasmaAgent`` and its parts (``plasma.agent``): the whole loop in one process.
- ``plasma.protocol``: the contract both sides share (messages, packets, telemetry, signing,
  topics, the bus seam, bundles, errors).
- ``plasma.edge``: the device runtime and daemon (light: no server code, no onnx, no training).
- ``plasma.server``: the adaptation stages and the publisher.

The agent's names load on first use (PEP 562), so ``import plasma.edge`` stays light.
"""

from typing import Any

_AGENT_NAMES = frozenset({
    "AgentError", "AuditRecord", "InstructionPacket", "JudicialAuditor", "LearnResult",
    "LoRADistiller", "NominalModel", "PhantomPath", "PhantomPathSimulator", "PlasmaAgent", "SignedPacket",
    "SimulationResult", "StateTrace", "WorldState",
})

__all__ = sorted(_AGENT_NAMES)


def __getattr__(name: str) -> Any:
    if name in _AGENT_NAMES:
        from . import agent

        value = getattr(agent, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _AGENT_NAMES)
