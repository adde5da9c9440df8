"""FleetWatcher (the demo's and ``bench live``'s watcher) reads what a device runs from its online
status and its retained versions message; a last will (old with stale versions, or new with none)
changes no versions, and a retained versions message of an earlier run is no news."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from plasma.protocol import SigningKey, TrustStore, topics
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import MemoryBroker, MemoryBus
from plasma.server.tools.watch import FleetWatcher
from tests.helpers.bundles import PENDULUM_SMALL, bundle_path

F, D = "fw", "dev-0"


class QuietWatcher(FleetWatcher):
    """Records the versions it would evaluate instead of evaluating them."""

    def _evaluate(self, device: str, versions: Any) -> float:
        return 0.0


def _status(state: str, **fields: Any) -> bytes:
    return json.dumps({"fleet": F, "device": D, "state": state, **fields}).encode()


def _versions(versions: dict[str, int], since: float | None, steps: int | None = None) -> bytes:
    return json.dumps({"fleet": F, "device": D, "versions": versions, "steps": steps,
                       "since": since, "timestamp": 1.0}).encode()


@pytest.fixture
def watched(tmp_path: Path) -> Any:
    key = SigningKey.generate()
    _, public = key.save(tmp_path / "keys")
    broker = MemoryBroker()
    device = MemoryBus(broker)
    device.connect()
    # what an earlier run left retained: its will in the old form (the versions at its start)
    # and its versions message
    device.publish(topics.status(F, D), _status("offline", fleet_version=2, device_version=1,
                                                steps=0), retain=True)
    device.publish(topics.versions(F, D), _versions({"fleet": 5, "device": 3}, 100.0),
                   retain=True)
    bus = MemoryBus(broker)
    bus.connect()
    watcher = QuietWatcher(bus, F, {D: ""}, load_bundle(bundle_path(PENDULUM_SMALL)),
                           TrustStore.from_dir(public.parent), "Pendulum-v1", eval_episodes=1)
    yield watcher, device
    watcher.close()


def _evaluated(watcher: FleetWatcher) -> list[tuple[dict[str, int], int]]:
    """(versions, device steps) of every evaluation the watcher ran, in order."""
    watcher.drain(10)
    with watcher.lock:
        return [(dict(e.versions), e.steps) for e in watcher.tracks[D].evaluations]


def test_versions_come_from_online_statuses_and_the_versions_topic(watched: Any) -> None:
    watcher, device = watched
    track = watcher.tracks[D]
    assert track.online is False and track.versions == {"fleet": 0, "device": 0}
    send = device.publish
    send(topics.versions(F, D), _versions({"fleet": 1, "device": 0}, 200.0))  # before online
    send(topics.status(F, D), _status("online", versions={"fleet": 1, "device": 0},
                                      fleet_version=1, device_version=0, steps=40, since=200.0))
    assert (track.online, track.since, track.steps, track.first_packet_steps) == \
        (True, 200.0, 40, 40)
    send(topics.versions(F, D), _versions({"fleet": 1, "device": 4}, 200.0, steps=55))  # accept
    assert track.versions == {"fleet": 1, "device": 4} and track.steps == 55
    send(topics.versions(F, D), _versions({"fleet": 9, "device": 9}, 100.0))  # an earlier run
    assert track.versions == {"fleet": 1, "device": 4}
    # the new will: offline, no versions, no steps; what the device ran stays known
    send(topics.status(F, D), _status("offline", base_sha256="ab" * 32, since=200.0,
                                      timestamp=200.0, versions={}, fleet_version=None,
                                      device_version=None, steps=None))
    assert track.online is False and track.versions == {"fleet": 1, "device": 4}
    send(topics.versions(F, D), _versions({"fleet": 7, "device": 7}, 300.0))  # not yet online
    send(topics.status(F, D), _status("online", fleet_version=2, device_version=5, steps=10))
    assert track.versions == {"fleet": 2, "device": 5} and track.steps == 55  # an older device
    assert _evaluated(watcher) == [({"fleet": 0, "device": 0}, 0), ({"fleet": 1, "device": 0}, 40),
                                   ({"fleet": 1, "device": 4}, 55), ({"fleet": 2, "device": 5}, 55)]
