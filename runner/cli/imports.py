"""What the command line keeps out of its process: optional packages its libraries probe for.

- pandas: pyarrow looks for it the first time it converts Python values to an array (any
  ``pa.array([...])``), to recognise pandas objects; importing pandas costs about half a
  second of CPU and 30 MB. The runner passes pyarrow no pandas object.
- trio: httpcore imports it when installed, in case it runs under trio; the command line
  runs on asyncio (``anyio.run``'s default backend).
- httpx._main: httpx's own command line, which ``import httpx`` loads when click, rich and
  pygments are installed (about 60 ms of CPU); without it ``httpx.main`` is a stub. click
  itself stays importable (uvicorn needs it).

While a command runs, importing any of them fails with ModuleNotFoundError, as if it were not
installed: the prober records "absent" and moves on. Afterwards all import again as usual
(pyarrow's own ``to_pandas`` retries the import when it is called). A package that is
already imported is left as it is.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType

UNUSED = ("pandas", "trio", "httpx._main")


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
