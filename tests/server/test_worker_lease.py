"""Several servers of one fleet share the store: only the one whose publisher holds the fleet's
lease runs adaptation rounds; when the lease moves, the new holder continues from the cursors
the old one saved (no data used twice)."""

from __future__ import annotations

from dataclasses import replace

from plasma.protocol import SigningKey
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import MemoryBroker, MemoryBus
from plasma.server.adapt import adapt_config
from plasma.server.executor import LocalExecutor
from plasma.server.publisher import Publisher, PublisherConfig
from plasma.server.run import policy_from_bundle
from plasma.server.store import TraceStore
from plasma.server.tasks import PENDULUM
from plasma.server.worker import AdaptationWorker, ScheduleConfig
from tests.helpers.bundles import PENDULUM_SMALL, bundle_path

from .test_ray_executor import _batch

_SMALL = adapt_config("small")
_ROUND = replace(_SMALL, dagger_iters=1, expert_paths=4, phantom_paths=32, select_paths=32,
                 distill=replace(_SMALL.distill, steps=60), judicial=replace(_SMALL.judicial, paths=64))


def _server(path, broker, holder: str):  # type: ignore[no-untyped-def]
    bundle = load_bundle(bundle_path(PENDULUM_SMALL))
    store = TraceStore(path)
    bus = MemoryBus(broker)
    bus.connect()
    publisher = Publisher(bus, store, SigningKey.generate(), PublisherConfig(
        fleet="f", base_sha256=bundle.base_sha256, min_interval_s=0.0, lease_holder=holder))
    publisher.start()
    worker = AdaptationWorker(store, publisher, PENDULUM, policy_from_bundle(bundle),
                              ScheduleConfig("f", min_new_transitions=300, check_interval=0.1),
                              _ROUND, LocalExecutor())
    return store, publisher, worker


def test_only_the_lease_holder_adapts_and_the_next_holder_resumes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = MemoryBroker()
    path = tmp_path / "shared.sqlite"
    store_a, pub_a, worker_a = _server(path, broker, "a")
    store_b, pub_b, worker_b = _server(path, broker, "b")
    try:
        for seq in range(2):
            store_a.add_traces(_batch("f", "d1", seq))
        assert pub_a.is_leader and not pub_b.is_leader
        for _ in range(3):
            worker_b.tick(0.0)
            worker_a.tick(0.0)
        assert worker_a.device_rounds == 1 and worker_b.device_rounds == 0
        assert len(store_a.audits("f", "d1", auditor="judicial")) == 1
        # the holder stops and its lease moves: the new holder resumes from the cursor a saved
        pub_a.stop()
        assert pub_b.renew_lease() and pub_b.is_leader
        for _ in range(2):
            worker_b.tick(0.0)
        assert worker_b.device_rounds == 0, "the data a's round used were used again"
        assert worker_b.cursor["d1"] == worker_a.cursor["d1"]
        store_b.add_traces(_batch("f", "d1", 2, n=300))
        worker_b.tick(0.0)
        worker_b.tick(0.0)
        assert worker_b.device_rounds == 1
        assert len(store_b.audits("f", "d1", auditor="judicial")) == 2
    finally:
        pub_b.stop()
        store_a.close()
        store_b.close()
