"""Edge runtime: one weight side's ONNX Runtime sessions over shared int8 buffers, pre-bound for batch 1."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from plasma.protocol.bundle import Bundle, BundleError

__all__ = ["PlainSession", "preoptimize", "Runner", "SessionSide", "SwapMode"]

log = logging.getLogger(__name__)

SwapMode = Literal["rebuild", "inplace"]


class Runner:
    """One session over a side's buffers with its batch-1 binding: what act() reads, as ONE reference.

    Immutable once made, so a call that read it runs wholly on one session and one set of buffers.
    """

    __slots__ = ("session", "binding", "obs_buf", "out_row", "prepacked", "_keep")

    def __init__(self, session: ort.InferenceSession, binding: ort.IOBinding, obs_buf: np.ndarray,
                 out_row: np.ndarray, prepacked: bool, keep: list[ort.OrtValue]) -> None:
        self.session, self.binding, self.obs_buf, self.out_row = session, binding, obs_buf, out_row
        self.prepacked = prepacked
        self._keep = keep  # ORT borrows the buffers: the OrtValues must outlive the session


class SessionSide:
    """One weight state: int8/scale buffers shared with its session(s), and pre-bound batch-1 I/O buffers.

    ``current`` is the runner act() uses while this side is active. With ``tiered`` a non-prepacked
    runner (``plain``, made once: it sees buffer writes on its next run) lives beside the prepacked
    one (``fast``, None while the buffers hold writes it has not seen). ``generation`` counts writes.
    ``build_fast`` False (tiered only) starts a side without its prepacked session.
    """

    def __init__(self, bundle: Bundle, base_q: Mapping[str, tuple[np.ndarray, np.ndarray]], prepack: bool,
                 graph: bytes | None = None, *, tiered: bool = False, build_fast: bool = True) -> None:
        self._bundle = bundle
        self._prepack = prepack
        self._graph = graph  # ORT-optimized model bytes (see preoptimize), or None for the file as shipped
        self.q = {name: q.copy() for name, (q, _) in base_q.items()}  # name -> int8 (in, out)
        self.scale = {name: s.copy() for name, (_, s) in base_q.items()}  # name -> float32 (out,)
        m = bundle.manifest
        self.obs_buf = np.zeros((1, m.obs_dim), np.float32)  # bound input, shared by this side's runners
        self.out_buf = np.zeros((1, m.act_dim), np.float32)  # bound output
        self.out_row: np.ndarray = self.out_buf[0]  # (act_dim,) view handed back by act()
        self.generation = 0  # bumped by PolicyRuntime.begin_write before the buffers are written
        self.plain: Runner | None = self._make(prepack=False) if tiered or not prepack else None
        self.fast: Runner | None = None
        self.current: Runner
        if prepack and (build_fast or self.plain is None):
            self.install(self.build())
        else:  # tiered and build_fast False: the prepacked session is built when it goes live
            assert self.plain is not None
            self.current = self.plain

    @property
    def session(self) -> ort.InferenceSession:
        return self.current.session

    @property
    def binding(self) -> ort.IOBinding:
        return self.current.binding

    def build(self) -> Runner:
        """A new session over the current buffers (prepacked unless the side is "inplace"); not installed.

        From pre-optimized bytes (when the side has them) with optimizations off: about half the
        build time, the same run() time (docs/benchmarks.md, "Edge runtime: session builds").
        """
        return self._make(prepack=self._prepack)

    def install(self, runner: Runner) -> None:
        """Make ``runner`` (built over the buffers as they are now) this side's session."""
        if runner.prepacked:
            self.fast = runner
        self.current = runner

    def _make(self, *, prepack: bool) -> Runner:
        so = _options(optimize=self._graph is None)
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        keep = []  # ORT borrows these buffers: the OrtValues must outlive the session
        for e in self._bundle.manifest.layers:
            for init_name, buf in ((e.weight_q, self.q[e.name]), (e.weight_scale, self.scale[e.name])):
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                so.add_initializer(init_name, value)
                keep.append(value)
        try:
            session = ort.InferenceSession(self._graph or self._bundle.model_bytes, so, providers=_PROVIDERS)
        except (RuntimeError, ValueError) as exc:  # ORT's Fail/InvalidGraph/InvalidArgument derive from these
            raise BundleError(f"onnxruntime refused {self._bundle.int8_path.name}: {exc}", code="bad_model") from None
        binding = session.io_binding()
        keep += [ort.OrtValue.ortvalue_from_numpy(self.obs_buf), ort.OrtValue.ortvalue_from_numpy(self.out_buf)]
        binding.bind_ortvalue_input("obs", keep[-2])
        binding.bind_ortvalue_output("action", keep[-1])
        return Runner(session, binding, self.obs_buf, self.out_row, prepack, keep)

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        """(n, obs_dim) -> (n, act_dim), a fresh array (plain run with a dict feed) on ``current``."""
        x = np.ascontiguousarray(obs, dtype=np.float32).reshape(-1, self._bundle.manifest.obs_dim)
        out: np.ndarray = self.current.session.run(["action"], {"obs": x})[0]
        return out

_PROVIDERS = ["CPUExecutionProvider"]


def _options(*, optimize: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # one control thread per device; a pool only adds wake-up jitter
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: library code prints nothing
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def preoptimize(model_bytes: bytes) -> bytes | None:
    """Let ORT fuse the graph once (DynamicQuantizeMatMul) and serialize it, so each rebuild skips it.

    The result is specific to this machine's ORT build and CPU, so it is made at load and never
    stored. None if ORT will not serialize it (the caller then builds from the shipped bytes).
    """
    so = _options()
    with tempfile.TemporaryDirectory(prefix="plasma-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        so.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(model_bytes, so, providers=_PROVIDERS)
            return path.read_bytes()
        except (RuntimeError, OSError) as exc:
            log.warning("could not pre-optimize the policy graph (%s); rebuilding from the shipped model", exc)
            return None


class PlainSession:
    """The shipped model exactly as in the file: no shared buffers, default prepacking."""

    def __init__(self, bundle: Bundle) -> None:
        self.session = ort.InferenceSession(bundle.model_bytes, _options(), providers=_PROVIDERS)
        self._obs_dim = bundle.manifest.obs_dim

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(obs, dtype=np.float32).reshape(-1, self._obs_dim)
        out: np.ndarray = self.session.run(["action"], {"obs": x})[0]
        return out
