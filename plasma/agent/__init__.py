"""The in-process library: ``PlasmaAgent`` (think, act, learn, evolve) and its parts, each usable
on its own. It runs the same code as the fleet service: the edge runtime of ``plasma-edge run``
and the adaptation round of ``plasma-server run``.
"""

from plasma.protocol import AuditRecord, InstructionPacket, StateTrace, WorldState

from .agent import AgentError, LearnResult, PlasmaAgent
from .packets import LoRADistiller, SignedPacket
from .simulation import NominalModel, PhantomPath, PhantomPathSimulator, SimulationResult
from .trace_audit import JudicialAuditor, TraceAuditConfig

__all__ = [
    "AgentError", "AuditRecord", "InstructionPacket", "JudicialAuditor", "LearnResult",
    "LoRADistiller", "NominalModel", "PhantomPath", "PhantomPathSimulator", "PlasmaAgent",
    "SignedPacket", "SimulationResult", "StateTrace", "TraceAuditConfig", "WorldState",
]
