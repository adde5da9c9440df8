"""Server tasks: the ``TaskSpec`` of each environment, the registry, the shipped tasks.

``registry`` holds ``TaskSpec``, ``register_task`` and ``get_task``; ``classic`` the
classic-control tasks (Pendulum-v1, MountainCarContinuous-v0); ``mujoco`` the MuJoCo simulator
stepped from observations and the shipped InvertedPendulum-v5 and HalfCheetah-v5 (registered
on first use).
Physics overrides share one syntax with the device (``plasma.edge.physics``).
"""

from __future__ import annotations

from .classic import MOUNTAINCAR, PENDULUM, mountaincar_reward, mountaincar_step, pendulum_reward, pendulum_step
from .mujoco import HALF_CHEETAH_ID, INVERTED_PENDULUM_ID, half_cheetah, inverted_pendulum
from .registry import (
                      BUILDERS,
                      TASKS,
                      RewardFn,
                      SimStepFn,
                      TaskSpec,
                      apply_physics,
                      get_task,
                      load_task_modules,
                      make_env,
                      register_task,
                      resolve_physics,
)

__all__ = ["apply_physics", "get_task", "load_task_modules", "make_env", "MOUNTAINCAR", "mountaincar_reward",
           "mountaincar_step", "PENDULUM", "pendulum_reward", "pendulum_step", "register_task",
           "resolve_physics", "RewardFn", "SimStepFn", "TASKS", "TaskSpec"]

TASKS.update({t.env_id: t for t in (PENDULUM, MOUNTAINCAR)})
BUILDERS[INVERTED_PENDULUM_ID] = inverted_pendulum
BUILDERS[HALF_CHEETAH_ID] = half_cheetah
