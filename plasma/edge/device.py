"""The device runtime assembled in process: a bundle, a trust store and a state directory in, a
policy that acts and takes packets out. No broker, no threads of its own.

``EdgeDevice`` wires the edge stages exactly as ``plasma-edge run`` does (int8 runtime, merge
engine, journal, protocol and model audits, canary, observation ring), so a library user, the
in-process agent and a test get the daemon's behaviour without its process::

    device = EdgeDevice.open(bundle_dir, trust_dir, state_dir, fleet="f", device="d")
    action = device.act(obs)                # int8 policy, base + accepted adapters
    outcome = device.receive(packet_bytes)  # audited, journaled, merged (or rejected)
    outcome = device.observe(obs, reward)   # feeds the canary: a rollback Outcome or None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from plasma.protocol import Adapter, TrustStore
from plasma.protocol.bundle import Bundle, load_bundle

from .audit import AuditContext
from .canary import Canary, CanaryConfig
from .journal import Journal
from .merge import MergeEngine
from .pipeline import AdapterPipeline, Outcome
from .probes import AuditThresholds, ObservationRing
from .runtime import PolicyRuntime

__all__ = ["DeviceConfig", "EdgeDevice"]


@dataclass(frozen=True)
class DeviceConfig:
    """What an in-process device needs besides its bundle, trust store and state directory."""

    fleet: str = "local"
    """Fleet id the device belongs to (packets for another fleet are rejected)."""
    device: str = "device-0"
    """Device id (device-slot packets for another device are rejected)."""
    max_rank: int = 64
    """Largest adapter rank accepted."""
    max_packet_bytes: int = 1 << 20
    """Packets above this size are rejected before they are read."""
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    """Rolling-reward regression test after each activation."""
    audit: AuditThresholds = field(default_factory=AuditThresholds)
    """Model-audit thresholds (behaviour probes on the device's own recent observations)."""


class EdgeDevice:
    """One device's policy and adapter state; call ``act`` from one control thread."""

    def __init__(self, bundle: Bundle, trust: TrustStore, state_dir: str | Path,
                 cfg: DeviceConfig = DeviceConfig()) -> None:
        self.bundle, self.cfg = bundle, cfg
        self.runtime = PolicyRuntime(bundle)
        self.ring = ObservationRing(1024, bundle.manifest.obs_dim)
        self.canary = Canary(cfg.canary)
        ctx = AuditContext(trust=trust, fleet=cfg.fleet, device=cfg.device,
                           base_sha256=bundle.base_sha256,
                           layers={n: (i, o) for n, i, o in bundle.layer_specs},
                           max_rank=cfg.max_rank, max_bytes=cfg.max_packet_bytes)
        self.pipeline = AdapterPipeline(self.runtime, MergeEngine(self.runtime),
                                        Journal(Path(state_dir)), ctx, self.canary, self.ring,
                                        cfg.audit)
        self.notes = self.pipeline.restore()
        """What restoring the journal found (one line each), e.g. a re-verified adapter."""

    @classmethod
    def open(cls, bundle_dir: str | Path, trust_dir: str | Path, state_dir: str | Path,
             **config: Any) -> EdgeDevice:
        """From paths: the bundle directory, a directory of trusted ``*.pub`` keys, the state.
        ``config`` holds ``DeviceConfig`` fields by name (unknown names raise TypeError)."""
        return cls(load_bundle(bundle_dir), TrustStore.from_dir(trust_dir), state_dir,
                   DeviceConfig(**config))

    def act(self, obs: np.ndarray) -> np.ndarray:
        """(obs_dim,) -> a copy of the (act_dim,) action of the active int8 policy."""
        return self.runtime.act(np.asarray(obs, np.float32)).copy()

    def observe(self, obs: np.ndarray, reward: float) -> Outcome | None:
        """Record one real step for the probes and the canary; a rollback's Outcome if the
        canary found the last activation regressing (the previous adapters are live again)."""
        self.ring.push(np.asarray(obs, np.float32))
        verdict = self.canary.push(float(reward))
        return self.pipeline.on_canary(verdict) if verdict is not None else None

    def receive(self, packet: bytes, source: str = "") -> Outcome:
        """Audit, journal and merge one packet; the Outcome holds the edge AuditRecord.
        ``source`` is the slot whose topic it arrived on ("fleet" or "device"), if any."""
        return self.pipeline.handle(packet, source=source)

    def active_adapters(self) -> dict[str, Adapter | None]:
        """The adapter live in each slot (None: the base weights there)."""
        return {slot: (p.adapter if p is not None and p.adapter.layers else None)
                for slot, p in self.pipeline.live.items()}

    @property
    def versions(self) -> tuple[int, ...]:
        """Active adapter versions in slot-table order, (fleet, device) (0: none)."""
        return self.pipeline.versions
