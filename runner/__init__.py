"""runner: push large manifests of FLUX requests through fal.ai's queue, resumably.

The public API (see :mod:`runner.api`)::

    import runner

    report = runner.run("night.csv", max_cost="25", ledger="night.runner")
    if report.exit_code != 0:
        raise RuntimeError(report.message)

``run`` is synchronous and safe from any thread; ``arun`` is its async twin; ``plan``,
``preview`` (what a rerun would do), ``status`` and ``load_ledger`` read without sending
anything. Names are imported on first
use, so ``import runner`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Plan",
    "Preview",
    "RunReport",
    "RunnerError",
    "StatusSummary",
    "UsageError",
    "__version__",
    "arun",
    "load_ledger",
    "plan",
    "preview",
    "run",
    "status",
]

if TYPE_CHECKING:
    from runner.api import arun, load_ledger, plan, preview, run, status
    from runner.errors import RunnerError, UsageError
    from runner.execution.preview import Preview
    from runner.execution.summary import RunReport
    from runner.ledger.views import StatusSummary
    from runner.manifest.plan import Plan

_WHERE = {
    "arun": "runner.api",
    "run": "runner.api",
    "plan": "runner.api",
    "preview": "runner.api",
    "Preview": "runner.execution.preview",
    "status": "runner.api",
    "load_ledger": "runner.api",
    "RunReport": "runner.execution.summary",
    "Plan": "runner.manifest.plan",
    "StatusSummary": "runner.ledger.views",
    "RunnerError": "runner.errors",
    "UsageError": "runner.errors",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'runner' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(where), name)
