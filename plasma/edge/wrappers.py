"""Device-side wrappers: effects of the real device that no simulator parameter names.

A wrapper is any class taking the env and giving ``reset``/``step`` back (``--wrapper
module:Class`` on ``plasma-edge run``, ``--device-wrapper`` on ``bench live``). The server is
never told: it has to learn the effect from the device's transitions.

``ActionDelay`` is the one shipped: the device applies the action chosen one control step
earlier (a one-step actuation delay, common on real motor drivers). Nothing here imports
Gymnasium: attributes the wrapper does not define are read from the wrapped env.
"""

from __future__ import annotations

from typing import Any, SupportsFloat

import numpy as np

__all__ = ["ActionDelay"]


class ActionDelay:
    """Apply the previous step's action (zeros on the first step of an episode)."""

    def __init__(self, env: Any, steps: int = 1) -> None:
        if steps < 1:
            raise ValueError("ActionDelay needs steps >= 1")
        self.env = env
        self.steps = steps
        self._queue: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:  # observation_space, action_space, unwrapped, ...
        return getattr(self.env, name)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
        space = getattr(self.env, "action_space", None)
        shape = tuple(getattr(space, "shape", ()) or ())
        self._queue = [np.zeros(shape, np.float32) for _ in range(self.steps)]
        if options is None:
            return self.env.reset(seed=seed)  # type: ignore[no-any-return]
        return self.env.reset(seed=seed, options=options)  # type: ignore[no-any-return]

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        self._queue.append(np.asarray(action, np.float32))
        applied = self._queue.pop(0)
        return self.env.step(applied)  # type: ignore[no-any-return]

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if callable(close):
            close()
