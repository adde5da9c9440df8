"""Edge stage 8b: each model-level check as a table, the probes on synthetic and real policies."""

from __future__ import annotations

import numpy as np
import pytest

from plasma.edge.audit import (
    PROTOCOL_CHECKS,
    AuditContext,
    ModelPolicies,
    ModelSpace,
    audit_model,
    audit_packet,
)
from plasma.edge.merge import MergeEngine
from plasma.edge.probes import (
    BEHAVIOUR_CHECKS,
    AuditThresholds,
    ModelEvidence,
    ObservationRing,
    behaviour_scores,
    check_action_bounds,
    check_action_change,
    check_delta_norm,
    check_finite,
    check_sensitivity,
    delta_ratios,
    probe_observations,
)
from plasma.edge.runtime import PolicyRuntime
from plasma.protocol import Adapter, DecodedPacket, SigningKey, TrustStore, encode_packet
from plasma.protocol.bundle import Bundle
from plasma.protocol.checks import CheckResult
from plasma.protocol.wire import Reason

TH = AuditThresholds()


def scores(**kw: float) -> ModelEvidence:
    base = {"action_change_mean": 0.0, "action_change_p90": 0.0, "action_out_of_bounds": 0.0,
            "action_finite": 1.0, "sensitivity_ratio": 1.0}
    return ModelEvidence(ratios={}, behaviour={**base, **kw})


def ratios(**kw: float) -> ModelEvidence:
    return ModelEvidence(ratios=kw)


@pytest.mark.parametrize("check, arg, code", [
    (check_delta_norm, ratios(l0=0.1, l1=0.99), None),
    (check_delta_norm, ratios(l0=0.1, l1=1.01), "delta_too_large"),
    (check_delta_norm, ratios(), None),
    (check_action_change, scores(action_change_mean=0.1, action_change_p90=0.5), None),
    (check_action_change, scores(action_change_mean=0.4), "action_change_too_large"),
    (check_action_change, scores(action_change_p90=0.8), "action_change_too_large"),
    (check_action_change, scores(action_change_mean=float("nan")), "action_change_too_large"),
    (check_action_bounds, scores(action_out_of_bounds=0.0005), None),
    (check_action_bounds, scores(action_out_of_bounds=0.01), "action_out_of_bounds"),
    (check_action_bounds, scores(action_finite=0.0), "non_finite_action"),
    (check_sensitivity, scores(sensitivity_ratio=3.9), None),
    (check_sensitivity, scores(sensitivity_ratio=4.1), "too_sensitive"),
    (check_sensitivity, scores(sensitivity_ratio=float("inf")), "too_sensitive"),
])
def test_check_table(check, arg, code) -> None:  # type: ignore[no-untyped-def]
    reason, _ = check(arg, TH)
    assert (reason.code if reason else None) == code


def adapter(a: float, b: float, name: str = "l0", shape: tuple[int, int] = (4, 3)) -> Adapter:
    n_in, n_out = shape
    return Adapter(alpha=1.0, rank=1, layers={name: (np.full((1, n_in), a, np.float32),
                                                     np.full((n_out, 1), b, np.float32))})


@pytest.mark.parametrize("factors, code", [
    ((0.1, 0.1), None),
    ((1e20, 1e20), "non_finite"),  # finite factors, B @ A overflows float32
])
def test_check_finite(factors: tuple[float, float], code: str | None) -> None:
    ad = adapter(*factors)
    found = delta_ratios(ad, {"l0": np.ones((3, 4), np.float32)})
    reason, _ = check_finite(ModelEvidence(ratios=found, finite=ad.is_finite()), TH)
    assert (reason.code if reason else None) == code


def test_delta_ratio_is_relative_frobenius() -> None:
    w = np.ones((3, 4), np.float32)  # ||W|| = sqrt(12)
    r = delta_ratios(adapter(0.5, 0.5), {"l0": w})["l0"]  # delta = 0.25 everywhere
    assert r == pytest.approx(0.25)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_thresholds_refuse_nonsense(bad: float) -> None:
    with pytest.raises(ValueError):
        AuditThresholds(max_delta_ratio=bad)


def test_ring_keeps_the_latest_in_order() -> None:
    ring = ObservationRing(3, 1)
    assert ring.snapshot().shape == (0, 1)
    for v in range(5):
        ring.push(np.array([v], np.float32))
    assert ring.snapshot()[:, 0].tolist() == [2.0, 3.0, 4.0] and len(ring) == 3


def test_probe_observations_prefer_real_ones() -> None:
    rng = np.random.default_rng(0)
    low, high = np.zeros(2), np.ones(2)
    recent = np.full((100, 2), 7.0, np.float32)
    assert (probe_observations(recent, 10, low, high, rng) == 7.0).all()
    mixed = probe_observations(recent[:3], 10, low, high, rng)
    assert (mixed[:3] == 7.0).all() and ((mixed[3:] >= 0) & (mixed[3:] <= 1)).all()


# -- behaviour_scores on synthetic policies: (n, 2) obs -> (n, 1) action in [-1, 1] -------------
LOW, HIGH, STD = np.array([-1.0]), np.array([1.0]), np.ones(2)


def smooth(x: np.ndarray) -> np.ndarray:
    return np.tanh(x[:, :1] * 0.5)


@pytest.mark.parametrize("candidate, key, lo, hi", [
    (smooth, "action_change_mean", 0.0, 1e-9),
    (smooth, "sensitivity_ratio", 0.99, 1.01),
    (lambda x: smooth(x) + 0.4, "action_change_mean", 0.19, 0.21),  # 0.4 of a range of 2
    (lambda x: smooth(x) + 0.4, "action_out_of_bounds", 0.0, 0.2),
    (lambda x: np.tanh(x[:, :1] * 0.5) * 3, "action_out_of_bounds", 0.1, 1.0),
    (lambda x: np.tanh(np.sin(x[:, :1] * 300)), "sensitivity_ratio", 10.0, 1e6),  # hypersensitive
    (lambda x: np.full((len(x), 1), np.nan), "action_finite", 0.0, 0.0),
])
def test_behaviour_scores(candidate, key: str, lo: float, hi: float) -> None:  # type: ignore[no-untyped-def]
    obs = np.random.default_rng(1).normal(size=(64, 2)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        s = behaviour_scores(smooth, candidate, smooth, obs, LOW, HIGH, TH, STD,
                             np.random.default_rng(2))
    assert lo <= s[key] <= hi, s


# -- on the real runtime: probes run on the staged (inactive) side -----------------------------
def real_adapter(bundle: Bundle, size: float, seed: int = 0) -> Adapter:
    rng = np.random.default_rng(seed)
    layers = {name: (rng.normal(0, 1, (2, n_in)).astype(np.float32) / np.sqrt(n_in),
                     (size * rng.normal(0, 1, (n_out, 2)) / np.sqrt(n_in)).astype(np.float32))
              for name, n_in, n_out in bundle.layer_specs}
    return Adapter(alpha=2.0, rank=2, layers=layers)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def judged(bundle: Bundle, key: SigningKey, ad: Adapter, ring: ObservationRing | None = None,
           th: AuditThresholds = TH, **checks: tuple) -> tuple[tuple, dict, MergeEngine]:
    runtime = PolicyRuntime(bundle)
    engine = MergeEngine(runtime)
    ctx = AuditContext(trust=TrustStore([key.public_key]), base_sha256=bundle.base_sha256,
                       layers={n: (i, o) for n, i, o in bundle.layer_specs})
    data = encode_packet(ad, key=key, fleet="f1", slot="fleet", version=1,
                         base_sha256=bundle.base_sha256)
    verdict = audit_packet(data, ctx)
    assert verdict.accepted and verdict.packet is not None
    staged = engine.stage({"fleet": verdict.packet.adapter})
    policies = ModelPolicies(runtime.act_batch, staged.act_batch, runtime.base_act_batch)
    reasons, s = audit_model(verdict.packet, bundle.weights, policies,
                             ModelSpace.from_manifest(bundle.manifest), ring, th, **checks)
    return reasons, s, engine


def test_small_adapter_passes_on_real_observations(bundle: Bundle, key: SigningKey) -> None:
    ring = ObservationRing(256, bundle.manifest.obs_dim)
    for x in np.random.default_rng(0).normal(size=(200, bundle.manifest.obs_dim)):
        ring.push(x)
    reasons, s, engine = judged(bundle, key, real_adapter(bundle, 0.05), ring)
    assert reasons == () and s["probe_real_fraction"] == 1.0
    assert 0 < s["action_change_mean"] < 0.05
    assert engine.active["fleet"] is None  # probing never makes the candidate live


@pytest.mark.parametrize("size, th, code", [
    (20.0, TH, "delta_too_large"),
    (6.0, AuditThresholds(max_delta_ratio=100.0), "action_change_too_large"),
])
def test_large_adapters_are_refused(bundle: Bundle, key: SigningKey, size: float,
                                    th: AuditThresholds, code: str) -> None:
    reasons, s, _ = judged(bundle, key, real_adapter(bundle, size), None, th)
    assert code in [r.code for r in reasons], s


def test_delta_ratio_gram_path_matches_the_explicit_product() -> None:
    """The (rank, rank) Gram shortcut gives the same ratio as ||c B A||_F computed in full."""
    from plasma.edge.probes import _percentile
    from plasma.protocol import Adapter

    rng = np.random.default_rng(7)
    base = {"l": rng.normal(size=(48, 20)).astype(np.float32)}
    for rank in (1, 3, 8):
        a = rng.normal(size=(rank, 20)).astype(np.float32)
        b = rng.normal(size=(48, rank)).astype(np.float32)
        adapter = Adapter(alpha=3.0, rank=rank, layers={"l": (a, b)})
        want = np.linalg.norm(adapter.delta("l")) / np.linalg.norm(base["l"])
        assert delta_ratios(adapter, base)["l"] == pytest.approx(float(want), rel=1e-5)
    huge = Adapter(alpha=1.0, rank=2, layers={"l": (np.full((2, 20), 1e20, np.float32),
                                                    np.full((48, 2), 1e20, np.float32))})
    assert delta_ratios(huge, base)["l"] == float("inf")  # overflows float32, as the merge would
    for n in (1, 2, 7, 32):
        x = rng.random(n)
        assert _percentile(x, 90.0) == pytest.approx(float(np.percentile(x, 90)), abs=1e-12)


# -- one check convention: adding a check is one function and one tuple entry ------------------
def check_calm(ev: ModelEvidence, th: AuditThresholds) -> CheckResult[Reason]:
    """A test-local behaviour check: any action change at all is too much."""
    change = ev.behaviour["action_change_max"]
    if change > 0:
        return CheckResult(Reason(code="not_calm", check="calm", message=f"moved {change:.3f}"),
                           {"calm_change": change})
    return CheckResult(None, {"calm_change": change})


def test_adding_a_model_check_is_one_function_and_one_entry(bundle: Bundle,
                                                             key: SigningKey) -> None:
    ad = real_adapter(bundle, 0.05)
    reasons, s, _ = judged(bundle, key, ad)
    assert reasons == () and "calm_change" not in s
    reasons, s, _ = judged(bundle, key, ad, behaviour_checks=BEHAVIOUR_CHECKS + (check_calm,))
    assert [r.code for r in reasons] == ["not_calm"] and s["calm_change"] > 0


def test_adding_a_packet_check_is_one_function_and_one_entry(bundle: Bundle,
                                                              key: SigningKey) -> None:
    def odd_version(p: DecodedPacket, ctx: AuditContext) -> CheckResult[Reason]:
        bad = p.header.version % 2 == 1
        return CheckResult(Reason(code="odd_version", check="odd_version", message="odd")
                           if bad else None, {})

    ctx = AuditContext(trust=TrustStore([key.public_key]), base_sha256=bundle.base_sha256)
    data = encode_packet(None, key=key, fleet="f1", slot="fleet", version=1,
                         base_sha256=bundle.base_sha256)
    assert audit_packet(data, ctx).accepted
    verdict = audit_packet(data, ctx, checks=PROTOCOL_CHECKS + (odd_version,))
    assert [r.code for r in verdict.record.reasons] == ["odd_version"]
