"""plasma-server import-policy: ONNX files written by the real PyTorch and Stable-Baselines3 exporters
(tests/fixtures/onnx_import, made by make_fixtures.py there) -> bundles that act like the file, run
on the edge runtime and take a LoRA merge; unsupported graphs give the typed error, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from plasma.edge.merge import MergeEngine
from plasma.edge.runtime import PolicyRuntime, reference_forward
from plasma.protocol.bundle import load_bundle
from plasma.protocol.errors import BundleError, ConfigError
from plasma.server.cli import main
from plasma.server.export import export_bundle
from plasma.server.importer import import_policy
from plasma.server.policy_net import Adam, LoRA
from plasma.server.run import policy_from_bundle, to_adapter

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "onnx_import"
PENDULUM_HIGH = np.array([1.0, 1.0, 8.0], np.float32)

# fixture -> (hidden activation, alpha, output, action bounds, import options)
CASES = {
    "torch_relu_gemm": ("relu", None, "clip", 2.0, {}),
    "torch_tanh_squash_gemm": ("tanh", None, "tanh", 1.0, {}),
    "torch_tanh_matmul": ("tanh", None, "clip", 2.0, {}),
    "torch_elu_dynamo": ("elu", 1.0, "clip", 2.0, {}),
    "torch_leaky_dynamo": ("leaky_relu", 0.2, "clip", 2.0, {}),
    "torch_relu_dynamo": ("relu", None, "tanh", 1.0, {}),
    "torch_normalized_leaky": ("leaky_relu", 0.01, "tanh", 2.0, {}),
    "sb3_sac": ("relu", None, "tanh", 2.0, {"rescale_actions": True}),
    "sb3_sac_rescaled": ("relu", None, "tanh", 2.0, {}),
    "sb3_td3": ("relu", None, "tanh", 1.0, {}),
    "sb3_ppo": ("tanh", None, "clip", 2.0, {}),
}
INT8_TOLERANCE = 0.02
"""Largest int8 action error as a fraction of the action span (the reduce-range scheme on 16-32 wide
layers; the bench bundle's int8 error is of the same order)."""


def _obs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-PENDULUM_HIGH, PENDULUM_HIGH, size=(n, 3)).astype(np.float32)


def _ort(path: Path, obs: np.ndarray) -> np.ndarray:
    """The original file's first output, row by row (the recipes export a batch of 1)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: obs[k:k + 1]})[0] for k in range(len(obs))])


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("imported")
    return {name: (root / name, import_policy(FIXTURES / f"{name}.onnx", "Pendulum-v1", root / name, **case[4]))
            for name, case in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_imported_bundle_acts_like_the_original_file(name: str, imported: dict) -> None:
    hidden, alpha, output, bound, opts = CASES[name]
    root, report = imported[name]
    bundle = load_bundle(root)
    m = bundle.manifest
    assert (m.hidden_activation, m.output_activation, m.act_low, m.act_high) == (hidden, output, [-bound], [bound])
    assert m.activation_alpha == pytest.approx(alpha) if alpha is not None else m.activation_alpha is None
    assert m.weight_qmax == 64 and m.env_id == "Pendulum-v1" and m.meta["imported_from"] == f"{name}.onnx"
    if name == "torch_normalized_leaky":  # (obs - mean) / std in the graph became the bundle's normalization
        assert np.allclose(m.obs_mean, [0.1, -0.2, 0.5]) and np.allclose(m.obs_std, [0.7, 0.7, 4.0])
    obs = _obs(300, seed=7)  # not the importer's own probe observations
    want = _ort(FIXTURES / f"{name}.onnx", obs).astype(np.float64)
    if opts.get("rescale_actions"):
        want = -2.0 + (want + 1.0) * 2.0
    want = np.clip(want, -bound, bound)  # a clip output: the env's bounds; a tanh: already inside
    span = 2 * bound
    fp32 = reference_forward(bundle, obs)
    server = policy_from_bundle(bundle).forward(obs)
    int8 = PolicyRuntime(bundle).act_batch(obs)
    assert np.abs(fp32 - want).max() / span < 1e-5
    assert np.abs(server - want).max() / span < 1e-5
    assert np.abs(int8 - want).max() / span < INT8_TOLERANCE
    assert report["max_error_int8_of_span"] < INT8_TOLERANCE and report["max_error_fp32_of_span"] < 1e-5


def test_sb3_actor_rescaled_by_flag_equals_rescale_in_the_graph(imported: dict) -> None:
    """SAC exported as the recipe writes it (+ --rescale-actions) and with the rescale inside the graph."""
    a, b = load_bundle(imported["sb3_sac"][0]), load_bundle(imported["sb3_sac_rescaled"][0])
    obs = _obs(200, seed=3)
    assert np.abs(reference_forward(a, obs) - reference_forward(b, obs)).max() < 1e-5
    assert a.manifest.base_sha256 == b.manifest.base_sha256  # the same int8 model, bit for bit


@pytest.mark.parametrize("name", ["torch_elu_dynamo", "torch_leaky_dynamo", "sb3_sac_rescaled", "sb3_ppo"])
def test_real_lora_merges_into_imported_bundle_on_the_edge(name: str, imported: dict, tmp_path: Path) -> None:
    """A LoRA trained by gradient descent with the server's policy math, merged by the edge engine."""
    bundle = load_bundle(imported[name][0])
    policy = policy_from_bundle(bundle)
    obs = _obs(256, seed=11)
    span = policy.act_high - policy.act_low
    target = np.clip(policy.forward(obs) + 0.15 * span * np.sin(2 * obs[:, :1]), policy.act_low, policy.act_high)
    lora = LoRA.init(policy, rank=2, seed=0)
    opt = Adam(lora.params(), lr=1e-2)
    losses = []
    for _ in range(150):
        act, cache = policy.forward_cache(obs, lora)
        losses.append(float(np.mean((act - target) ** 2)))
        _, grads = policy.backward(cache, 2 * (act - target) / len(obs))
        opt.step(grads)
    assert losses[-1] < 0.3 * losses[0]  # the adapter learned the shift
    runtime = PolicyRuntime(bundle)
    engine = MergeEngine(runtime)
    engine.activate(engine.stage({"fleet": to_adapter(lora)}))
    probe = _obs(300, seed=12)
    server = policy.forward(probe, lora)
    base_err = np.abs(runtime.base_act_batch(probe) - policy.forward(probe)).max()
    err = np.abs(runtime.act_batch(probe) - server).max()
    assert np.abs(server - policy.forward(probe)).max() > 10 * base_err  # the merge matters
    assert err / span.max() < INT8_TOLERANCE
    # and the merged int8 weights are the ones the exporter writes for the merged fp32 policy
    merged = policy.merged(lora)
    fresh = export_bundle(tmp_path / "merged", merged.layers, obs_mean=merged.obs_mean, obs_std=merged.obs_std,
                          act_low=merged.act_low, act_high=merged.act_high, **merged.activations)
    assert np.abs(runtime.act_batch(probe) - PolicyRuntime(load_bundle(fresh)).act_batch(probe)).max() < 1e-5


def _graph_with(op_node: onnx.NodeProto, extra: list[onnx.TensorProto]) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["obs", "W"], ["h"], name="fc"), op_node],
        "g", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w, *extra])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_graphs_name_the_first_bad_node_and_op(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as err:
        import_policy(FIXTURES / "torch_softmax.onnx", "Pendulum-v1", tmp_path / "a")
    assert err.value.code == "unsupported_graph"
    assert "'/3/Softmax'" in str(err.value) and "op Softmax" in str(err.value)
    sig = helper.make_node("Sigmoid", ["h"], ["y"], name="squash_me")
    onnx.save(_graph_with(sig, []), tmp_path / "sigmoid.onnx")
    with pytest.raises(BundleError, match=r"node 'squash_me' \(op Sigmoid\)"):
        import_policy(tmp_path / "sigmoid.onnx", "Pendulum-v1", tmp_path / "b")
    rng = np.random.default_rng(0)
    mixed = helper.make_graph(  # Relu then Tanh between three layers: one hidden activation only
        [helper.make_node("Gemm", ["obs", "W0"], ["z0"], name="g0", transB=1),
         helper.make_node("Relu", ["z0"], ["h0"], name="first_act"),
         helper.make_node("Gemm", ["h0", "W1"], ["z1"], name="g1", transB=1),
         helper.make_node("Tanh", ["z1"], ["h1"], name="second_act"),
         helper.make_node("Gemm", ["h1", "W2"], ["y"], name="g2", transB=1)],
        "mixed", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
         for n, s in (("W0", (4, 3)), ("W1", (4, 4)), ("W2", (1, 4)))])
    onnx.save(helper.make_model(mixed, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mixed.onnx")
    with pytest.raises(BundleError, match=r"node 'second_act' \(op Tanh\) differs from the first hidden"):
        import_policy(tmp_path / "mixed.onnx", "Pendulum-v1", tmp_path / "e")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError) as err:
        import_policy(tmp_path / "junk.onnx", "Pendulum-v1", tmp_path / "c")
    assert err.value.code == "bad_model"
    with pytest.raises(ConfigError) as cerr:  # 3 observations, but MountainCarContinuous gives 2
        import_policy(FIXTURES / "torch_relu_gemm.onnx", "MountainCarContinuous-v0", tmp_path / "d")
    assert cerr.value.code == "env_mismatch"
    assert not any((tmp_path / d).exists() for d in "abcde")  # nothing half-written


def test_cli_exit_codes_and_the_docs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import-policy", str(FIXTURES / "torch_softmax.onnx"), "--env", "Pendulum-v1",
                 "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "op Softmax" in err and "Traceback" not in err
    (tmp_path / "a-file").write_text("")
    for args in (["--env", "NoSuchEnv-v9", "--out", str(tmp_path / "x")], ["--env", "Pendulum-v1", "--out",
                 str(tmp_path / "a-file")]):
        assert main(["import-policy", str(FIXTURES / "sb3_td3.onnx"), *args]) == 1
        assert "Traceback" not in capsys.readouterr().err
    # the command of docs/bring-your-policy.md, on an SB3 SAC actor exported with the recipe
    doc = (Path(__file__).resolve().parents[2] / "docs" / "bring-your-policy.md").read_text()
    assert "plasma-server import-policy my_sac_actor.onnx --env Pendulum-v1 --rescale-actions --out my-bundle" in doc
    (tmp_path / "my_sac_actor.onnx").write_bytes((FIXTURES / "sb3_sac.onnx").read_bytes())
    assert main(["import-policy", str(tmp_path / "my_sac_actor.onnx"), "--env", "Pendulum-v1", "--rescale-actions",
                 "--out", str(tmp_path / "my-bundle")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == [3, 32, 32, 1] and report["max_error_int8_of_span"] < INT8_TOLERANCE
    assert load_bundle(tmp_path / "my-bundle").manifest.act_high == [2.0]
