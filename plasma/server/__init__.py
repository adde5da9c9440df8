"""Plasma's server side: trace store, ingest, world model, phantom paths, distillation, judicial
audit, publisher, and the ``Server`` that assembles them for one fleet.

The public names load on first access (PEP 562): ``import plasma.server`` imports no stage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    # the stages, in data-flow order
    "TraceStore": "store", "Ingest": "ingest", "IngestConfig": "ingest",
    "WorldModel": "worldmodel", "WorldModelConfig": "worldmodel",
    "PhantomPathSimulator": "phantom", "PhantomConfig": "phantom",
    "LoRADistiller": "distill", "DistillConfig": "distill",
    "JudicialAuditor": "judicial", "JudicialConfig": "judicial",
    "Publisher": "publisher", "PublisherConfig": "publisher",
    # the process
    "Server": "run", "run_server": "run", "ServiceConfig": "service_config",
    "load_service_config": "service_config", "TaskSpec": "tasks", "get_task": "tasks",
    "MLPPolicy": "policy_net",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # `X as X`: explicit re-exports for type checkers (__all__ is computed)
    from .distill import DistillConfig as DistillConfig
    from .distill import LoRADistiller as LoRADistiller
    from .ingest import Ingest as Ingest
    from .ingest import IngestConfig as IngestConfig
    from .judicial import JudicialAuditor as JudicialAuditor
    from .judicial import JudicialConfig as JudicialConfig
    from .phantom import PhantomConfig as PhantomConfig
    from .phantom import PhantomPathSimulator as PhantomPathSimulator
    from .policy_net import MLPPolicy as MLPPolicy
    from .publisher import Publisher as Publisher
    from .publisher import PublisherConfig as PublisherConfig
    from .run import Server as Server
    from .run import run_server as run_server
    from .service_config import ServiceConfig as ServiceConfig
    from .service_config import load_service_config as load_service_config
    from .store import TraceStore as TraceStore
    from .tasks import TaskSpec as TaskSpec
    from .tasks import get_task as get_task
    from .worldmodel import WorldModel as WorldModel
    from .worldmodel import WorldModelConfig as WorldModelConfig


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
