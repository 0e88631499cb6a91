"""What the command line keeps out of its process, and how it imports what it keeps.

Optional packages its libraries probe for:

- pandas: pyarrow looks for it the first time it converts Python values to an array (any
  ``pa.array([...])``), to recognise pandas objects; importing pandas costs about half a
  second of CPU and 30 MB. The runner passes pyarrow no pandas object.
- dateutil: pyarrow looks for ``dateutil.relativedelta`` to recognise it as an interval
  value (about 2.5 ms of CPU with six). The runner passes none. While it is refused, pyarrow
  looks again at every conversion of Python values (``pa.array``, ``pa.scalar``): a failed
  import, a few microseconds each. A 1,000-job run makes 2 such conversions; code that
  converts per batch passes Arrow scalars, not Python ones, to kernels (``csvtext``).
  ``export`` makes thousands, so it admits dateutil (:func:`admit`).
- trio: httpcore imports it when installed, in case it runs under trio; the command line
  runs on asyncio (``anyio.run``'s default backend).
- httpx._main: httpx's own command line, which ``import httpx`` loads when click, rich and
  pygments are installed (about 60 ms of CPU); without it ``httpx.main`` is a stub. click
  itself stays importable (uvicorn needs it).

While a command runs, importing any of them fails with ModuleNotFoundError, as if it were not
installed: the prober records "absent" and moves on. Afterwards all import again as usual
(pyarrow's own ``to_pandas`` retries the import when it is called). A package that is
already imported is left as it is.

Collection while importing (:func:`collection_paused`): importing what ``runner run`` needs
makes a few hundred thousand objects that live as long as the process, and the cyclic
garbage collector, which runs every 700 new objects and scans the older generations now and
then, spent about a tenth of a short run's CPU scanning them (bench/README.md, start-up).
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType

UNUSED = ("pandas", "dateutil", "trio", "httpx._main")


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


@contextmanager
def without_unused() -> Iterator[None]:
    """Importing a package of UNUSED fails inside the block, unless it is imported already."""
    names = frozenset(n for n in UNUSED if n not in sys.modules)
    if not names:
        yield
        return
    finder = _Refuse(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def admit(name: str, module: str | None = None) -> None:
    """Let ``name`` (one of UNUSED) import again for the rest of the command, and import
    ``module`` (else ``name``) now if it is installed: for ``export``, which converts Python
    values to Arrow at every kernel call. pyarrow clears any error of its probe import, so a
    Ctrl-C whose handler ran inside a refused probe was lost (the export went on to exit 0);
    with the module imported, the probe finds it in ``sys.modules`` and runs no Python code.
    Where it is not installed the probe still fails, as it would without the runner."""
    for finder in sys.meta_path:
        if isinstance(finder, _Refuse):
            finder.names = finder.names - {name}
    try:
        importlib.import_module(module or name)
    except ImportError:
        return


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
