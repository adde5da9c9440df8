"""Edge stage 10: bundle -> onnxruntime policy, batch-1 act() on pre-bound buffers, two swappable weight sides.

The runtime owns two ``SessionSide`` objects (A and B). Each holds its own numpy buffers for
every layer's int8 weight (in, out) and float32 scale (out,), handed to ONNX Runtime with
``SessionOptions.add_initializer``. ``act()`` reads ``_live`` (one session runner over one side's
buffers) once per call, so a call runs wholly on one session and one weight state;
``plasma.edge.merge`` writes the other side and flips the reference.

Two ways to make a written side visible (``swap=``), measured on this 2-core x86 VM with
onnxruntime 1.32 and MLP 64-256x3-8 (dynamic int8), merging rank-8 adapters 5 ms apart:

- ``"rebuild"`` (default), *tiered*: each side holds two sessions over the SAME buffers, a
  non-prepacked one (``session.disable_prepacking=1``, made once at load: it sees buffer writes
  on its next run) and a prepacked one (act() 0.89-0.91x a bare ``run()``; stale once its
  buffers are written). ``begin_write`` (called by ``MergeEngine.stage``) waits until no act()
  can run on the inactive side and no prepacked build over it is owed (cancelled) or running
  (waited for), bumps the side's ``generation`` and puts the side on its non-prepacked
  session; the staged probes run there. MatMulInteger over int8 is exact integer arithmetic,
  so both sessions give bit-identical outputs (tested). ``flip`` makes the side live on its
  non-prepacked session at once (act() ~28-29 us, 1.5x bare, until the upgrade), and requests
  the prepacked build: done by the attached control loop in ``maintain()``/``idle()`` (session
  builds hold the GIL, ~1 ms: they must not run beside the loop), else by a background daemon
  thread started on demand (it ends after ``upgrade_linger_s`` idle). The result is installed
  by one reference assignment (act() reads ``_live`` once per call) only if that side is still
  active and its generation unchanged; otherwise it is dropped (``stale_builds``). Rollback to
  the previous side is a flip: its buffers were not rewritten, so its prepacked session holds.
  Measured (same runs, old = session rebuilt before activation): stage + activate p50 0.93-0.95
  ms against 1.97-2.17 ms (5 ms apart, no loop), 1.05-1.09 against 1.41-1.46 ms back to back;
  prepacked again 1.0 ms after the flip (background); with a 50 Hz control loop attached,
  stage + activate 0.94-1.0 ms against 2.2-2.3 ms (old waited for the loop's build); longest
  loop gap beyond the period 1.0-3.0 ms against 0.55-1.3 ms (the loop's own idle run: 0.2-0.7
  ms) - the builds run on the loop between ticks, the late ticks (~1 ms) are the next merge's
  numpy work holding the GIL when the loop wakes; per-merge stall p90 0.8-0.9 ms against 0.07.
  End to end (``plasma-server bench e2e``, rank 4): publish -> swap p50 3.3 ms against 3.9-4.0
  ms, device handle p50 2.9 ms against 3.6 ms.
  If the in-place self-test fails at load, the runtime logs a warning and works as before tiers
  (``tiered`` False): after writing a side, ``commit`` builds its prepacked session before it
  can be activated. Building holds the GIL, so from a second thread it stalled the control
  loop 3-12 ms per merge; hence the build is *cooperative*: a control loop registers with
  ``attach_control_loop()`` and calls ``maintain()`` between steps, or
  ``idle(time_to_next_tick)`` as its sleep; ``commit`` (from the merge thread) then only
  requests the build, and the control thread does it in its idle time and wakes the writer. A
  build that would not fit before the tick is put off to just after it (once). With no loop
  attached, or on the loop's own thread, ``commit`` builds at once; if the loop does not answer
  within ``build_timeout_s`` (a stuck env step) the writer builds itself and logs a warning.
- ``"inplace"``: only the non-prepacked session (DESIGN.md section 6). Stage + activate ~0.5 ms
  p50 and no build ever, but MatMulInteger repacks B on every call: act() ~28 us against
  18.7 us bare (ratio 1.5). Guarded by the same self-test; if it fails, "rebuild" (not tiered).

Dynamic int8 quantizes activations per tensor, so a row's action in ``act_batch`` depends on the
other rows of the batch (differences ~1e-3): compare probes batch-for-batch, never with act().
"""

from .policy_runtime import PolicyRuntime
from .quantize import quantize_weight, reference_forward
from .session import SessionSide, SwapMode

__all__ = ["PolicyRuntime", "SessionSide", "SwapMode", "quantize_weight", "reference_forward"]
