"""Edge stage 10: bundle -> onnxruntime policy, batch-1 act() on pre-bound buffers, two swappable weight sides.

The runtime owns two ``SessionSide`` objects (A and B). Each holds its own numpy buffers for
every layer's int8 weight (in, out) and float32 scale (out,), handed to ONNX Runtime with
``SessionOptions.add_initializer``. ``act()`` reads ``_live`` (one session runner over one side's
buffers) once per call, so a call runs wholly on one session and one weight state;
``plasma.edge.merge`` writes the other side and flips the reference.

Two ways to make a written side visible (``swap=``; docs/design.md section 6, figures in
docs/benchmarks.md):

- ``"rebuild"`` (default), *tiered*: each side holds two sessions over the SAME buffers, a
  non-prepacked one (``session.disable_prepacking=1``, made once at load: it sees buffer writes
  on its next run) and a prepacked one (faster; stale once its buffers are written).
  ``begin_write`` (called by ``MergeEngine.stage``) waits until no act() can run on the
  inactive side and no prepacked build over it is owed (cancelled) or running (waited for),
  bumps the side's ``generation`` and puts the side on its non-prepacked session; the staged
  probes run there. MatMulInteger over int8 is exact integer arithmetic, so both sessions give
  bit-identical outputs (tested). ``flip`` makes the side live on its non-prepacked session at
  once and requests the prepacked build: done by the attached control loop in
  ``maintain()``/``idle()`` (session builds hold the GIL: they must not run beside the loop),
  else by a background daemon thread started on demand (it ends after ``upgrade_linger_s``
  idle). The result is installed by one reference assignment (act() reads ``_live`` once per
  call) only if that side is still active and its generation unchanged; otherwise it is
  dropped (``stale_builds``). Rollback to the previous side is a flip: its buffers were not
  rewritten, so its prepacked session holds.
  If the in-place self-test fails at load, the runtime logs a warning and works as before tiers
  (``tiered`` False): after writing a side, ``commit`` builds its prepacked session before it
  can be activated. Building holds the GIL, so from a second thread it stalls the control
  loop; hence the build is *cooperative*: a control loop registers with
  ``attach_control_loop()`` and calls ``maintain()`` between steps, or
  ``idle(time_to_next_tick)`` as its sleep; ``commit`` (from the merge thread) then only
  requests the build, and the control thread does it in its idle time and wakes the writer. A
  build that would not fit before the tick is put off to just after it (once). With no loop
  attached, or on the loop's own thread, ``commit`` builds at once; if the loop does not answer
  within ``build_timeout_s`` (a stuck env step) the writer builds itself and logs a warning.
- ``"inplace"``: only the non-prepacked session: no build ever, but MatMulInteger repacks its
  weights on every call, so act() is slower. Guarded by the same self-test; if it fails,
  "rebuild" (not tiered).

Dynamic int8 quantizes activations per tensor, so a row's action in ``act_batch`` depends on the
other rows of the batch (differences ~1e-3): compare probes batch-for-batch, never with act().
"""

from .policy_runtime import PolicyRuntime
from .quantize import quantize_weight, reference_forward
from .session import SessionSide, SwapMode

__all__ = ["PolicyRuntime", "SessionSide", "SwapMode", "quantize_weight", "reference_forward"]
