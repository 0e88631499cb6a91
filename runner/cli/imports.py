"""What the command line keeps out of its process, and how it imports what it keeps.

Optional packages its libraries probe for:

- pandas: pyarrow looks for it the first time it converts Python values to an array (any
  ``pa.array([...])``), to recognise pandas objects; importing pandas costs about half a
  second of CPU and 30 MB. The runner passes pyarrow no pandas object.
- dateutil: pyarrow looks for ``dateutil.relativedelta`` to recognise it as an interval
  value (importing it: about 2.5 ms of CPU with six). The runner passes none. Where it is
  absent (a clean install) pyarrow looks again at every conversion of Python values
  (``pa.array``, ``pa.scalar``; an export makes thousands), and it clears any error of
  that import: a Ctrl-C whose handler ran inside it was lost, and an export went on to
  exit 0 (1 in 18 SIGINTs at 1M jobs). So while a command runs, ``dateutil`` and
  ``dateutil.relativedelta`` are stand-ins in ``sys.modules`` (:data:`STAND_INS`): the
  probe finds a class nothing is an instance of, at once, and runs no Python code.
- trio: httpcore imports it when installed, in case it runs under trio; the command line
  runs on asyncio (``anyio.run``'s default backend).
- httpx._main: httpx's own command line, which ``import httpx`` loads when click, rich and
  pygments are installed (about 60 ms of CPU); without it ``httpx.main`` is a stub. click
  itself stays importable (uvicorn needs it).

While a command runs, importing any of the others fails with ModuleNotFoundError, as if it
were not installed: the prober records "absent" and moves on. Afterwards all import again as
usual (pyarrow's own ``to_pandas`` retries the import when it is called; it keeps no
reference to the stand-ins). A package that is already imported is left as it is.

Collection while importing (:func:`collection_paused`): importing what ``runner run`` needs
makes a few hundred thousand objects that live as long as the process, and the cyclic
garbage collector, which runs every 700 new objects and scans the older generations now and
then, spent about a tenth of a short run's CPU scanning them (bench/README.md, start-up).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType

UNUSED = ("pandas", "trio", "httpx._main")
STAND_INS = ("dateutil", "dateutil.relativedelta")


class _Refuse:
    """A meta path finder that makes importing the named modules (and submodules) fail."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if any(name == n or name.startswith(n + ".") for n in self.names):
            raise ModuleNotFoundError(f"No module named {name!r} (runner: not needed)", name=name)
        return None


class _StandIn:
    """``dateutil.relativedelta.relativedelta`` while a command runs: no value is one."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("dateutil is not loaded while a runner command runs")


def _stand_ins() -> dict[str, ModuleType]:
    top, module = ModuleType(STAND_INS[0]), ModuleType(STAND_INS[1])
    module.relativedelta = _StandIn  # type: ignore[attr-defined]
    top.relativedelta = module  # type: ignore[attr-defined]
    return {top.__name__: top, module.__name__: module}


@contextmanager
def without_unused() -> Iterator[None]:
    """Importing a package of UNUSED fails inside the block, and dateutil is a stand-in
    (:data:`STAND_INS`), unless they are imported already."""
    names = frozenset(n for n in UNUSED if n not in sys.modules)
    stand_ins = {} if STAND_INS[0] in sys.modules else _stand_ins()
    finder = _Refuse(names)
    if names:
        sys.meta_path.insert(0, finder)
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        if names:
            sys.meta_path.remove(finder)
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


@contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block, until :func:`resume_collection` (or
    the block's end) freezes what was made (``gc.freeze``: never scanned again) and turns
    collection back on. The command line's own process only: a caller that had collection
    off already keeps it so."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    global _paused
    _paused = True
    try:
        yield
    finally:
        resume_collection()


_paused = False


def resume_collection() -> None:
    """Start-up is over (its imports are done): freeze and collect again. Idempotent; does
    nothing outside :func:`collection_paused`."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
