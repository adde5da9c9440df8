"""What a device runs: the slot combination every round is fitted and judged on.

A device runs base ⊕ fleet adapter ⊕ device adapter (``W = W_base + Δ_fleet + Δ_device``, the
edge's merge). Which versions it runs is the device's word, not the server's belief: a packet
may still be on its way, refused, or rolled back by the device's canary (which puts back the
state before it, not an empty slot). The server reads that word from

1. the device's retained versions message (``LiveVersions``, ``plasma/v1/F/device/D/versions``),
   sent at start, after every accept and rollback: ``DeviceVersions`` keeps the newest per device;
2. else the versions columns of its newest stored transition (telemetry names the adapters live
   when each row was recorded).

and the weights a version names from the signed bytes of the packet published as that version
(kept with the publication in the store), decoded as the device decoded them (int8 factors
included): ``PublishedAdapters``. A version the store does not hold raises ``UnknownVersion``:
the server does not guess what a device runs.

``DeviceSlots`` puts them together for the ``AdaptationWorker``: what a device runs, whether a
fleet packet may still land on it, and which device adapter may be live with the next fleet
adapter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from pydantic import ValidationError

from plasma.protocol import LiveVersions, PacketError, TraceBatch, TrustStore, decode_packet, topics
from plasma.protocol.bus import Bus, Message
from plasma.protocol.errors import ServiceError

from .policy_net import LoRA, MLPPolicy
from .store import Store

__all__ = ["Combination", "DeviceSlots", "DeviceVersions", "PublishedAdapters", "Source", "UnknownVersion",
           "reported_versions"]

log = logging.getLogger(__name__)

MAX_VERSIONS_BYTES = 4096

Source = Literal["versions", "telemetry", "server"]
"""Who said what a device runs (``Combination.source``)."""


class UnknownVersion(ServiceError):
    """A device reports a version whose packet this server's store does not hold."""

    code = "unknown_version"


@dataclass(frozen=True)
class Combination:
    """One device's slots: base ⊕ ``fleet`` ⊕ ``device`` (None: an empty slot)."""

    fleet_version: int
    fleet: LoRA | None
    device_version: int
    device: LoRA | None
    source: Source = "server"
    """Who said so: ``versions`` (the device's LiveVersions), ``telemetry`` (its newest stored
    transition) or ``server`` (nothing reported: the server's own accepted adapters)."""
    next_device: LoRA | None = None
    """A device adapter the server accepted for it that it does not report running yet (queued,
    on its way, or refused): it may be live when a fleet packet lands, so a fleet candidate is
    judged with it too."""

    def policy(self, base: MLPPolicy) -> MLPPolicy:
        """base ⊕ fleet adapter: the policy the device slot's adapter is relative to."""
        return base.merged(self.fleet)

    def describe(self) -> str:
        return f"fleet v{self.fleet_version} + device v{self.device_version}" + \
            (" (a newer device adapter on its way)" if self.next_device is not None else "")

    def device_adapters(self) -> list[LoRA | None]:
        """Every device adapter that may be live with the fleet slot: the one it runs, and the
        one on its way."""
        return [self.device] + ([self.next_device] if self.next_device is not None else [])


class DeviceVersions:
    """device -> the versions it reports running, from its retained versions topic."""

    def __init__(self, fleet: str) -> None:
        self.fleet = fleet
        self._lock = threading.Lock()
        self._live: dict[str, tuple[float, dict[str, int]]] = {}
        self.refused = 0
        """Messages on the versions topics that were not a valid report of their device."""

    def start(self, bus: Bus) -> None:
        bus.subscribe(topics.device_filter(self.fleet, "versions"), self._on_message, qos=1)

    def _on_message(self, message: Message) -> None:
        if self.handle(message) is not None:
            self.refused += 1

    def handle(self, message: Message) -> str | None:
        """Keep one report (the newest by its timestamp); returns a refusal code or None."""
        if not message.payload:
            return None  # a cleared retained message: says nothing
        if len(message.payload) > MAX_VERSIONS_BYTES:
            return "too_large"
        try:
            topic = topics.parse(message.topic)
            live = LiveVersions.model_validate_json(message.payload)
        except (ValueError, ValidationError):
            return "malformed"
        if topic.kind != "versions" or live.fleet != self.fleet \
                or (live.fleet, live.device) != (topic.fleet, topic.device):
            return "identity_mismatch"
        with self._lock:
            old = self._live.get(live.device)
            if old is None or live.timestamp >= old[0]:
                self._live[live.device] = (live.timestamp, live.slot_versions())
        return None

    def get(self, device: str) -> dict[str, int] | None:
        with self._lock:
            entry = self._live.get(device)
        return dict(entry[1]) if entry is not None else None


def reported_versions(live: DeviceVersions | None, device: str, batch: TraceBatch | None
                      ) -> tuple[dict[str, int], Source] | None:
    """(slot -> version, source) the device reports running; None when it reports nothing."""
    if live is not None and (versions := live.get(device)) is not None:
        return versions, "versions"
    if batch is not None and len(batch) and batch.versions:
        return {slot: int(np.asarray(col)[-1]) for slot, col in batch.versions.items()}, \
            "telemetry"
    return None


class PublishedAdapters:
    """(slot, target, version) -> the adapter that packet carried, decoded from the store."""

    def __init__(self, store: Store, fleet: str, trust: TrustStore) -> None:
        self.store, self.fleet, self.trust = store, fleet, trust
        self._cache: dict[tuple[str, str, int], LoRA | None] = {}
        self._lock = threading.Lock()

    def adapter(self, slot: str, target: str, version: int) -> LoRA | None:
        """The adapter of that version (None for version 0 or a packet that cleared the slot);
        raises ``UnknownVersion`` when the store holds no packet of that version."""
        if version == 0:
            return None
        key = (slot, target, version)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        data = self.store.published_packet(self.fleet, slot, target, version)
        if data is None:
            raise UnknownVersion(f"{slot} adapter v{version} of {target}: this server's store "
                                 "holds no packet of that version")
        try:
            packet = decode_packet(data, self.trust)
        except PacketError as exc:
            raise UnknownVersion(f"{slot} adapter v{version} of {target}: the stored packet does "
                                 f"not verify ({exc.code})") from None
        adapter = packet.adapter
        lora = LoRA({n: (np.array(a, np.float32), np.array(b, np.float32))
                     for n, (a, b) in adapter.layers.items()}, float(adapter.alpha),
                    int(adapter.rank)) if adapter.layers else None
        with self._lock:
            self._cache[key] = lora
        return lora

    def combination(self, device: str, versions: dict[str, int], source: Source
                    ) -> Combination:
        """The adapters the reported versions name (``UnknownVersion`` if one is not held)."""
        fv, dv = int(versions.get("fleet", 0)), int(versions.get("device", 0))
        return Combination(fv, self.adapter("fleet", self.fleet, fv), dv,
                           self.adapter("device", device, dv), source)


class DeviceSlots:
    """The worker's view of every device's slots: reports, published packets, the queue.

    ``waiting(slot, device)``: whether the publisher still holds an adapter for that target."""

    def __init__(self, store: Store, fleet: str, trust: TrustStore,
                 waiting: Callable[[str, str | None], bool],
                 live: DeviceVersions | None = None, *, landing_timeout: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.fleet, self.waiting, self.live = store, fleet, waiting, live
        self.landing_timeout, self.clock = landing_timeout, clock
        """``fleet_in_flight`` stops waiting for a fleet packet published this long ago (0: never)."""
        self.adapters = PublishedAdapters(store, fleet, trust)

    def running(self, device: str, batch: TraceBatch | None, fallback: Combination
                ) -> Combination:
        """What ``device`` runs by its own report; ``fallback`` (the server's accepted adapters)
        when it reports nothing. Raises ``UnknownVersion``."""
        reported = reported_versions(self.live, device, batch)
        if reported is None:
            return fallback
        return self.adapters.combination(device, *reported)

    def newest(self, slot: str, target: str) -> int:
        """The newest version this server published (reserved) for that slot target."""
        return self.store.current_version(self.fleet, slot, target)

    def fleet_in_flight(self, device: str, runs: Combination) -> str | None:
        """Why a fleet packet may still land on ``device``, or None: queued for publication, or
        published above the version it reports and not refused in its acks. A device adapter
        fitted meanwhile would land over a fleet adapter it was not fitted on. A device that
        neither reports nor refuses a fleet packet published more than ``landing_timeout``
        seconds ago is not waited for any longer (logged): its round fits what it reports."""
        if runs.source == "server":
            return None
        if self.waiting("fleet", None):
            return "the fleet adapter queued for publication has gone out"
        newest = self.newest("fleet", self.fleet)
        if runs.fleet_version >= newest:
            return None
        state = self.store.device_state(self.fleet, device, "fleet")
        if state["last_verdict"] in ("rejected", "rolled_back") and \
                int(state["last_version"]) >= newest:  # type: ignore[call-overload]
            return None  # it refused the newest: what it runs is what it keeps
        if self.landing_timeout > 0:
            sent = self.store.published_at(self.fleet, "fleet", self.fleet, newest)
            age = self.clock() - sent if sent is not None else 0.0
            if age > self.landing_timeout:
                log.warning("device %s: fleet adapter v%d went out %.0f s ago and it still reports "
                            "v%d without refusing it; its round fits what it reports",
                            device, newest, age, runs.fleet_version)
                return None
        return f"fleet adapter v{newest} has landed or been refused (it runs v{runs.fleet_version})"

    def with_next_device(self, device: str, runs: Combination, accepted: LoRA | None
                         ) -> Combination:
        """``runs`` plus ``accepted`` (the device adapter the server accepted for it last) when
        the device does not report running it yet (queued, on its way, or refused)."""
        if accepted is None or (runs.device_version == self.newest("device", device)
                                and not self.waiting("device", device)):
            return runs
        return replace(runs, next_device=accepted)

    def start_from(self, device: str, runs: Combination, accepted: LoRA | None
                   ) -> tuple[LoRA | None, bool]:
        """The device adapter a device round starts from, and whether that is not the learner's
        own (``accepted``): the one the device runs when it is not the newest published for it
        (refused, rolled back, or not arrived); else ``accepted`` (the same, or a newer one
        still queued), or what it runs if the learner has none."""
        newest = self.newest("device", device)
        if runs.device_version == newest:
            return (accepted, False) if accepted is not None else (runs.device, False)
        if accepted is None and runs.device is None:
            return None, False
        log.warning("device %s runs device adapter v%d, not v%d (refused, rolled back or not "
                    "arrived yet); its next adapter starts from the one it runs", device,
                    runs.device_version, newest)
        return runs.device, True
