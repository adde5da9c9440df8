"""Edge stages 8-9: the journal syncs while the candidate is staged and probed."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from plasma.edge import journal_files as files
from plasma.edge.audit import AuditContext
from plasma.edge.canary import Canary
from plasma.edge.journal import Journal
from plasma.edge.merge import MergeEngine
from plasma.edge.pipeline import AdapterPipeline
from plasma.edge.runtime import PolicyRuntime
from plasma.protocol import Adapter, SigningKey, TrustStore, encode_packet
from plasma.protocol.bundle import Bundle

KEY = SigningKey.generate()


def make_pipeline(bundle: Bundle, state: Path, defer_upgrade: bool = False) -> AdapterPipeline:
    """A device (re)starting on ``state``: restore() re-applies what the journal holds."""
    runtime = PolicyRuntime(bundle)
    ctx = AuditContext(trust=TrustStore([KEY.public_key]), fleet="f1", device="d1",
                       base_sha256=bundle.base_sha256,
                       layers={n: (i, o) for n, i, o in bundle.layer_specs})
    pipeline = AdapterPipeline(runtime, MergeEngine(runtime), Journal(state), ctx, Canary(), None,
                               defer_upgrade=defer_upgrade)
    pipeline.restore()
    return pipeline


def packet(bundle: Bundle, version: int, scale: float) -> bytes:
    name, n_in, n_out = bundle.layer_specs[1]
    rng = np.random.default_rng(version)
    adapter = Adapter(alpha=1.0, rank=2, layers={name: (scale * rng.normal(size=(2, n_in)),
                                                        scale * rng.normal(size=(n_out, 2)))})
    return encode_packet(adapter, key=KEY, fleet="f1", slot="device", device="d1",
                         version=version, base_sha256=bundle.base_sha256)


def test_sync_runs_beside_the_probes_and_lands_before_activation(
        bundle: Bundle, tmp_path: Path, monkeypatch) -> None:
    synced_on, order = [], []
    real_sync = files.datasync

    def sync(fd: int) -> None:
        synced_on.append(threading.current_thread().name)
        real_sync(fd)
        order.append("synced")

    monkeypatch.setattr(files, "datasync", sync)
    pipeline = make_pipeline(bundle, tmp_path)
    activate = pipeline.engine.activate
    monkeypatch.setattr(pipeline.engine, "activate",
                        lambda staged, **kw: (order.append("activated"), activate(staged, **kw)))
    assert pipeline.handle(packet(bundle, 1, 0.01)).record.verdict == "accepted"
    assert synced_on == ["plasma-journal-sync"] and order == ["synced", "activated"]
    assert make_pipeline(bundle, tmp_path).versions == (0, 1)  # a restart brings it back


def test_probe_rejected_packet_is_withdrawn_and_its_version_stays_burnt(
        bundle: Bundle, tmp_path: Path) -> None:
    pipeline = make_pipeline(bundle, tmp_path)
    assert pipeline.handle(packet(bundle, 1, 0.01)).record.verdict == "accepted"
    huge = pipeline.handle(packet(bundle, 2, 3.0))  # ||dW||/||W|| far above the bound
    assert huge.record.verdict == "rejected"
    assert huge.record.reasons[0].code != "state_write_failed"
    again = make_pipeline(bundle, tmp_path)
    assert again.versions == (0, 1)  # the withdrawn v2 is not re-applied...
    replay = again.handle(packet(bundle, 2, 0.01))
    assert replay.record.reasons[0].code == "replayed_version"  # ...and v2 stays refused


def test_restart_re_audits_a_record_left_pending_by_a_crash(bundle: Bundle,
                                                            tmp_path: Path) -> None:
    """A crash after the ACCEPT record synced but before its withdrawal was written."""
    pipeline = make_pipeline(bundle, tmp_path)
    assert pipeline.handle(packet(bundle, 1, 0.01)).record.verdict == "accepted"
    pending = pipeline.journal.begin("device", packet(bundle, 2, 3.0), 2)
    assert pending.wait() is None  # durable; the process "dies" before withdraw()
    again = make_pipeline(bundle, tmp_path)
    assert again.versions == (0, 1)  # the model audit on restart refuses v2
    assert again.journal.highest()["device"] == 2


def test_an_accept_reports_where_its_time_went(bundle: Bundle, tmp_path: Path) -> None:
    pipeline = make_pipeline(bundle, tmp_path)
    out = pipeline.handle(packet(bundle, 1, 0.01))
    assert out.record.verdict == "accepted"
    assert list(out.stages_ms) == ["audit", "journal_append", "stage", "probes", "sync_wait",
                                   "flip"]
    assert all(v >= 0 for v in out.stages_ms.values())
    assert sum(out.stages_ms.values()) <= out.elapsed_s * 1e3
    refused = pipeline.handle(packet(bundle, 1, 0.01))  # a replay stops after the audit
    assert refused.record.verdict == "rejected" and list(refused.stages_ms) == ["audit"]


def test_deferred_upgrade_is_owed_until_requested(bundle: Bundle, tmp_path: Path) -> None:
    """defer_upgrade (the daemon, bench e2e): the accepted side goes live on its exact
    non-prepacked session and its prepacked build starts only on request_upgrade()."""
    pipeline = make_pipeline(bundle, tmp_path, defer_upgrade=True)
    rt = pipeline.runtime
    assert pipeline.handle(packet(bundle, 1, 0.01)).record.verdict == "accepted"
    assert not rt.live_prepacked and rt._want is not None and rt._worker is None
    x = np.zeros((4, bundle.manifest.obs_dim), np.float32)
    live = rt.act_batch(x)
    rt.request_upgrade()
    assert rt.wait_upgraded() and rt.live_prepacked
    assert np.array_equal(rt.act_batch(x), live)
    rt.request_upgrade()  # nothing owed: a no-op
    assert rt.live_prepacked


def test_without_deferral_the_upgrade_starts_at_the_flip(bundle: Bundle, tmp_path: Path) -> None:
    pipeline = make_pipeline(bundle, tmp_path)
    assert pipeline.handle(packet(bundle, 1, 0.01)).record.verdict == "accepted"
    assert pipeline.runtime.wait_upgraded() and pipeline.runtime.live_prepacked
