"""LoRA instruction packets in process: distil phantom behaviour into a signed packet, and
hand a packet to a device (an in-process ``EdgeDevice``, or a daemon over MQTT).

``LoRADistiller.distill_from_simulation`` fits LoRA factors by gradient descent so the policy
imitates the best phantom path's actions, anchored to the base policy on every visited state,
and signs the result as a packet. ``PlasmaAgent.learn`` does not use it: a learning round is the
server's (world model, phantom DAgger, judicial review); this is the single-simulation tool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plasma.edge.device import EdgeDevice
from plasma.protocol import (
    AuditRecord,
    InstructionPacket,
    SigningKey,
    encode_packet,
    peek_header,
    topics,
)
from plasma.protocol.bus import Bus

from ..server.distill import DistillConfig
from ..server.distill import LoRADistiller as _Fitter
from ..server.policy_net import LoRA, MLPPolicy
from ..server.run import to_adapter
from .simulation import SimulationResult

__all__ = ["LoRADistiller", "SignedPacket"]


@dataclass(frozen=True)
class SignedPacket:
    """A signed packet: its header (``InstructionPacket``) and its bytes on the wire."""

    header: InstructionPacket
    data: bytes

    @property
    def target_layers(self) -> tuple[str, ...]:
        """Names of the layers the adapter changes (empty: it clears its slot)."""
        return tuple(layer.name for layer in self.header.layers)

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def size(self) -> int:
        """Bytes on the wire."""
        return len(self.data)


class LoRADistiller:
    """Distils phantom paths into signed LoRA packets for one device slot."""

    def __init__(self, policy: MLPPolicy, key: SigningKey, base_sha256: str, *,
                 fleet: str = "local", device: str = "agent", rank: int = 4, steps: int = 200,
                 anchor: float = 1.0, seed: int = 0) -> None:
        """``anchor`` weighs staying near the base policy's actions on every phantom state
        against imitating the best path (one path of 30 states is easy to overfit: at 0.05 the
        device refused the adapter as ``delta_too_large``, 1.75x the output layer's norm)."""
        self.policy, self.key, self.base_sha256 = policy, key, base_sha256
        self.fleet, self.device = fleet, device
        self.fitter = _Fitter(policy, DistillConfig(rank=rank, steps=steps, anchor=anchor,
                                                    seed=seed))
        self.version = 0

    def distill_from_simulation(self, simulation: SimulationResult,
                                init: LoRA | None = None) -> SignedPacket:
        """Imitate the best path's actions (anchored on every path's states); sign the adapter
        as the next device-slot version."""
        best = simulation.best
        states = best.obs[:-1].astype(np.float32)  # (horizon, obs_dim)
        anchors = np.concatenate([p.obs[:-1] for p in simulation.paths]).astype(np.float32)
        lora = self.fitter.fit(states, best.actions.astype(np.float32), anchor_states=anchors,
                               init=init).adapter
        return self.sign(lora)

    def sign(self, lora: LoRA | None, version: int | None = None) -> SignedPacket:
        """A signed device-slot packet for ``lora`` (None clears the slot)."""
        self.version = version if version is not None else self.version + 1
        data = encode_packet(None if lora is None else to_adapter(lora), key=self.key,
                             fleet=self.fleet, slot="device", device=self.device,
                             version=self.version, base_sha256=self.base_sha256)
        return SignedPacket(InstructionPacket.model_validate_json(peek_header(data).model_dump_json()), data)

    def inject_to_edge_agent(self, packet: SignedPacket | bytes,
                             target: EdgeDevice | Bus) -> AuditRecord | None:
        """Deliver ``packet``: into an in-process device (returns its edge AuditRecord, the
        verdict of its own audit), or onto a bus (retained, QoS 1, on the slot's topic; the
        daemon's record then arrives on its audit topic, so this returns None)."""
        data = packet.data if isinstance(packet, SignedPacket) else packet
        header = InstructionPacket.model_validate_json(peek_header(data).model_dump_json())
        if isinstance(target, EdgeDevice):
            record = target.receive(data, source=header.slot).record
            return AuditRecord.model_validate_json(record.model_dump_json())
        topic = topics.fleet_adapter(header.fleet) if header.slot == "fleet" else \
            topics.device_adapter(header.fleet, header.device or "")
        target.publish(topic, data, qos=1, retain=True)
        return None
