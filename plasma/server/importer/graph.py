"""Import stage 1: an ONNX file -> the chain of operations from its observation input to its action output.

A policy exported by ``torch.onnx.export`` (``nn.Sequential`` of ``Linear`` and activations) or
by Stable-Baselines3's export recipe is one chain: every operation takes the running tensor and
constants. Subgraphs of constants only (a ``Transpose`` of a weight, ``Constant`` nodes, shape
arithmetic on static shapes) are folded first by running them in onnxruntime, so what remains
is read as ``Step`` values: ``linear`` (W, b), ``affine`` (elementwise scale and shift),
``act`` (Relu, Tanh, Elu, LeakyRelu), ``clip`` (bounds). The first node outside that vocabulary
is refused with ``BundleError(code="unsupported_graph")`` naming the node and its op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from plasma.protocol.errors import BundleError

from ..export import ONNX_ACTIVATION_OPS

__all__ = ["Chain", "Step", "read_chain", "unsupported"]

_PASS_THROUGH = {"Identity", "Dropout", "Flatten", "Reshape", "Expand", "Squeeze", "Unsqueeze", "Cast"}
_SHAPE_INPUT = {"Reshape", "Expand"}
"""Ops whose second input is only a shape: SB3's actor expands its Gaussian mean to a shape computed
from the log-std branch, which is no part of the deterministic action. Their data input is followed;
that the shape leaves a (batch, width) tensor as it is, the run against the original file checks."""
_ACTIVATIONS = {op: name for name, op in ONNX_ACTIVATION_OPS.items()}
_MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass
class Step:
    """One operation on the running (batch, width) tensor, with the node it came from."""

    kind: str
    """linear | affine | act | clip"""
    node: str
    op: str
    w: np.ndarray | None = None  # linear: (out, in); affine: scale (width,) or scalar
    b: np.ndarray | None = None  # linear: (out,); affine: shift
    act: str = ""  # act: relu | tanh | elu | leaky_relu
    alpha: float | None = None
    low: np.ndarray | None = None  # clip bounds (None: unbounded on that side)
    high: np.ndarray | None = None


@dataclass
class Chain:
    """The policy as read from the file."""

    steps: list[Step]
    obs_dim: int
    input_name: str
    output_name: str
    notes: list[str] = field(default_factory=list)


def unsupported(node: onnx.NodeProto | str, op: str, why: str) -> BundleError:
    name = node if isinstance(node, str) else (node.name or f"<unnamed {node.op_type}>")
    return BundleError(f"unsupported graph: node {name!r} (op {op}) {why}; Plasma imports MLP policies "
                       "(Linear layers with Relu/Tanh/Elu/LeakyRelu, input normalization, a final tanh "
                       "and action rescale, or a clip)", code="unsupported_graph")


def _load(path: Path) -> onnx.ModelProto:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc})", code="missing_file") from None
    if size > _MAX_FILE_BYTES:
        raise BundleError(f"{path}: larger than {_MAX_FILE_BYTES} bytes", code="bad_model")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc})", code="missing_file") from None
    except onnx.checker.ValidationError as exc:
        raise BundleError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0]})", code="bad_model") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: the file is not ONNX at all
        raise BundleError(f"{path}: not an ONNX model ({type(exc).__name__})", code="bad_model") from None
    bad = next((n for n in model.graph.node if n.domain not in ("", "ai.onnx")), None)
    if bad is not None:
        raise unsupported(bad, f"{bad.domain}.{bad.op_type}", "is from a custom operator domain")
    return model


def _constants(model: onnx.ModelProto, opset: int) -> dict[str, np.ndarray]:
    """Initializers, Constant nodes and every node computable from them alone (folded in onnxruntime)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None:  # else it stays computed: refused later only if the action needs it
                consts[node.output[0]] = value
        elif node.input and all(i in consts or i == "" for i in node.input) and node.op_type not in _RANDOM:
            # a node that cannot be folded stays computed: refused later only if the action needs it
            for name, folded in zip(node.output, _fold(node, consts, opset, model.ir_version) or []):
                consts[name] = folded
    return consts


_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr))
    return None  # sparse or string constants: no part of an MLP policy


def _fold(node: onnx.NodeProto, consts: dict[str, np.ndarray], opset: int, ir_version: int) -> list[np.ndarray] | None:
    import onnxruntime as ort

    inputs = [i for i in node.input if i]
    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape)
         for i in inputs],
        [helper.make_empty_tensor_value_info(o) for o in node.output if o])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return list(sess.run(None, {i: consts[i] for i in inputs}))
    except Exception:  # noqa: BLE001 - onnxruntime's errors share no base class but Exception
        return None


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def read_chain(path: str | Path, output: str | None = None) -> Chain:
    """Read the chain from the single observation input to ``output`` (default: the first output)."""
    model = _load(Path(path))
    g = model.graph
    consts = _constants(model, _opset(model))
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1:
        raise BundleError(f"{path}: {len(inputs)} graph inputs ({[i.name for i in inputs]}); a policy has "
                          "one, the observation", code="unsupported_graph")
    outputs = [o.name for o in g.output]
    target = output or outputs[0]
    if target not in outputs:
        raise BundleError(f"{path}: no output {target!r}; outputs are {outputs}", code="unsupported_graph")
    obs_dim = _static_width(inputs[0])
    producer = {o: n for n in g.node for o in n.output}
    cone = _cone(target, producer, consts)
    steps: list[Step] = []
    notes: list[str] = []
    if len(outputs) > 1:
        notes.append(f"outputs {outputs}: importing {target!r}")
    cur, width = inputs[0].name, obs_dim
    while cur != target:
        users = [n for n in g.node if id(n) in cone and cur in n.input]
        if not users:
            raise BundleError(f"{path}: output {target!r} does not depend on the observation", code="unsupported_graph")
        if len(users) > 1:
            raise unsupported(users[1], users[1].op_type, f"branches off {cur!r} besides {users[0].name!r}; "
                              "a policy is one chain of layers")
        node = users[0]
        step, width = _step(node, cur, consts, width)
        if step is not None:
            steps.append(step)
        cur = node.output[0]
    return Chain(steps, obs_dim, inputs[0].name, target, notes)


def _static_width(value: onnx.ValueInfoProto) -> int:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise BundleError(f"input {value.name!r} has shape {[d.dim_value or d.dim_param for d in dims]}; "
                          "a policy takes (batch, obs_dim)", code="unsupported_graph")
    return int(dims[1].dim_value)


def _cone(target: str, producer: dict[str, onnx.NodeProto], consts: dict[str, np.ndarray]) -> set[int]:
    """Ids of the non-constant nodes the target depends on."""
    seen: set[int] = set()
    todo = [target]
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or name in consts or id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(i for i in (node.input[:1] if node.op_type in _SHAPE_INPUT else node.input) if i)
    return seen


def _vec(value: np.ndarray, width: int, node: onnx.NodeProto) -> np.ndarray:
    """A constant operand that broadcasts to one value per feature."""
    v = np.asarray(value, np.float64)
    if v.size == 1:
        return np.full(width, float(v.reshape(-1)[0]))
    if v.size == width and (v.ndim == 1 or (v.ndim == 2 and v.shape[0] == 1)):
        return v.reshape(-1)
    raise unsupported(node, node.op_type, f"has a constant of shape {v.shape} on a ({width},)-wide tensor")


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)  # type: ignore[no-any-return]
    return default


def _step(node: onnx.NodeProto, cur: str, consts: dict[str, np.ndarray], width: int) -> tuple[Step | None, int]:
    op, name = node.op_type, node.name or f"<unnamed {node.op_type}>"
    if op in _SHAPE_INPUT:
        if node.input[0] != cur:
            raise unsupported(node, op, "takes the observation stream as its shape")
        shape = consts.get(node.input[1]) if len(node.input) > 1 else None
        if op == "Reshape" and shape is not None:
            _pass_through(node, [shape], width)
        return None, width
    others = [i for i in node.input if i and i != cur]
    if any(i not in consts for i in others):
        raise unsupported(node, op, "combines the observation stream with another computed tensor")
    c = [consts[i] for i in others]
    if op in _PASS_THROUGH:
        _pass_through(node, c, width)
        return None, width
    if op in _ACTIVATIONS:
        alpha = float(_attr(node, "alpha", 1.0 if op == "Elu" else 0.01)) if op in ("Elu", "LeakyRelu") else None
        return Step("act", name, op, act=_ACTIVATIONS[op], alpha=alpha), width
    if op == "Gemm":
        if node.input[0] != cur or int(_attr(node, "transA", 0)):
            raise unsupported(node, op, "multiplies by the observation stream from the right")
        bmat = np.asarray(consts[node.input[1]], np.float64)
        w = bmat if int(_attr(node, "transB", 0)) else bmat.T  # (out, in)
        w = float(_attr(node, "alpha", 1.0)) * w
        if w.shape[1] != width:
            raise unsupported(node, op, f"takes {w.shape[1]} inputs, the stream has {width}")
        bias = np.zeros(w.shape[0])
        if len(node.input) > 2 and node.input[2]:
            bias = float(_attr(node, "beta", 1.0)) * _vec(consts[node.input[2]], w.shape[0], node)
        return Step("linear", name, op, w=w, b=bias), w.shape[0]
    if op == "MatMul":
        if node.input[0] != cur or np.asarray(c[0]).ndim != 2:
            raise unsupported(node, op, "is not stream @ constant 2-D weight")
        w = np.asarray(c[0], np.float64).T
        if w.shape[1] != width:
            raise unsupported(node, op, f"takes {w.shape[1]} inputs, the stream has {width}")
        return Step("linear", name, op, w=w, b=np.zeros(w.shape[0])), w.shape[0]
    if op in ("Add", "Sub", "Mul", "Div") and len(c) == 1:
        v = _vec(c[0], width, node)
        first = node.input[0] == cur
        one, zero = np.ones(width), np.zeros(width)
        if op == "Add":
            return Step("affine", name, op, w=one, b=v), width
        if op == "Sub":
            return (Step("affine", name, op, w=one, b=-v) if first else Step("affine", name, op, w=-one, b=v)), width
        if op == "Mul":
            return Step("affine", name, op, w=v, b=zero), width
        if first:
            return Step("affine", name, op, w=1.0 / v, b=zero), width
        raise unsupported(node, op, "divides a constant by the observation stream")
    if op == "Neg":
        return Step("affine", name, op, w=-np.ones(width), b=np.zeros(width)), width
    if op == "Clip":
        low = _vec(consts[node.input[1]], width, node) if len(node.input) > 1 and node.input[1] else None
        high = _vec(consts[node.input[2]], width, node) if len(node.input) > 2 and node.input[2] else None
        return Step("clip", name, op, low=low, high=high), width
    if op in ("Min", "Max") and len(c) == 1:
        v = _vec(c[0], width, node)
        return (Step("clip", name, op, high=v) if op == "Min" else Step("clip", name, op, low=v)), width
    raise unsupported(node, op, "is not an operation of an MLP policy")


def _pass_through(node: onnx.NodeProto, c: list[np.ndarray], width: int) -> None:
    """Shape and type no-ops on a (batch, width) float tensor; anything that changes it is refused."""
    op = node.op_type
    if op == "Cast" and int(_attr(node, "to", 0)) not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        raise unsupported(node, op, "casts to a non-float type")
    if op == "Flatten" and int(_attr(node, "axis", 1)) != 1:
        raise unsupported(node, op, "flattens at an axis other than 1")
    if op == "Reshape":
        shape = [int(s) for s in np.asarray(c[0]).reshape(-1)] if c else []
        if len(shape) != 2 or shape[1] not in (width, -1) or shape[0] not in (-1, 0, 1) or shape == [-1, -1]:
            raise unsupported(node, op, f"reshapes to {shape}, not (batch, {width})")
    if op in ("Squeeze", "Unsqueeze"):
        raise unsupported(node, op, "changes the rank of the (batch, features) stream")
    return None
