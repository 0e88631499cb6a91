"""The package's imports point down the stages, and the two sealed packages stay sealed.

Each module's imports are read with ``ast`` (every import statement, including those inside
functions), so a lazy import cannot climb the layers either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "runner"

# The stages, lowest first. A module may import its own stage and any stage before it.
LAYERS: tuple[str, ...] = (
    "errors",
    "libc",
    "endpoints",
    "emulator",
    "manifest",
    "fal",
    "ledger",
    "media",
    "config",
    "execution",
    "report",
    "scale",
    "options",
    "cli",
    "api",
    "__main__",
)
# What a top-level name of the package belongs to ("runner/__init__.py" is the public API).
_TOP = {"__init__": "api"}
# Names the package root defines itself, importing nothing: any stage may read them.
ROOT_CONSTANTS = frozenset({"__version__"})
# Sealed packages: what of the runner each may import besides itself.
SEALED: dict[str, frozenset[str]] = {
    "fal": frozenset({"errors"}),
    "emulator": frozenset({"errors", "endpoints"}),
}


def stage_of(module: str) -> str:
    """``runner.fal.client`` -> ``fal``; ``runner.cli`` -> ``cli``; ``runner`` -> ``api``."""
    parts = module.split(".")
    assert parts[0] == "runner", module
    if len(parts) == 1:
        return "api"
    return _TOP.get(parts[1], parts[1])


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool) -> list[tuple[int, str]]:
    """Every runner module that ``module`` imports, with the line of the import."""
    tree = ast.parse(source)
    here = module.split(".")
    package = here if is_package else here[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "runner"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "runner":
                continue
            if target == "runner":
                # ``from runner import x``: x is a module of the package, or a name of the API.
                for alias in node.names:
                    if alias.name in ROOT_CONSTANTS:
                        continue
                    sub = PACKAGE / alias.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").exists()
                    found.append((node.lineno, f"runner.{alias.name}" if is_module else "runner"))
            else:
                found.append((node.lineno, target))
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """What is wrong with the imports of ``module`` (whose text is ``source``), as sentences."""
    mine = stage_of(module)
    rank = LAYERS.index(mine)
    out: list[str] = []
    for line, target in imported_modules(source, module, is_package=is_package):
        theirs = stage_of(target)
        where = f"{module}:{line}"
        if theirs not in LAYERS:
            out.append(f"{where} imports {target}, whose stage {theirs!r} is not in LAYERS")
        elif target == "runner" and mine != "api":
            # The package root re-exports the API, which sits above everything else.
            out.append(f"{where} imports the package root; import the module that owns the name")
        elif LAYERS.index(theirs) > rank:
            out.append(f"{where}: {mine} imports {target}, a later stage ({theirs})")
        elif mine in SEALED and theirs != mine and theirs not in SEALED[mine]:
            allowed = ", ".join(sorted(SEALED[mine]))
            out.append(f"{where}: {mine} may import only {allowed} of the runner, not {target}")
    return out


def test_every_stage_of_the_package_is_in_layers() -> None:
    stages = {stage_of(module_name(p)) for p in modules()}
    assert stages <= set(LAYERS), stages - set(LAYERS)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_stages(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    module = module_name(path)
    assert violations(source, module, is_package=path.name == "__init__.py") == []


def test_the_checker_catches_an_upward_and_a_sealed_import() -> None:
    """The rule can fail: an upward import and a sealed-package breach are both reported."""
    source = (
        "from runner.endpoints.cost import Price\n"
        "from runner.execution.worker import run_job\n"
        "from runner import errors\n"
        "from runner.fal import protocol\n"
    )
    assert violations(source, "runner.fal.probe") == [
        "runner.fal.probe:1: fal may import only errors of the runner, not runner.endpoints.cost",
        "runner.fal.probe:2: fal imports runner.execution.worker, a later stage (execution)",
    ]


def test_relative_and_lazy_imports_are_read() -> None:
    source = "from . import cost\n\ndef f():\n    from ..execution import worker\n"
    assert violations(source, "runner.endpoints.probe") == [
        "runner.endpoints.probe:4: endpoints imports runner.execution, a later stage (execution)"
    ]


def test_the_package_root_is_for_the_api_only() -> None:
    found = violations("from runner import __version__, RunReport\n", "runner.media.probe")
    assert found == [
        "runner.media.probe:1 imports the package root; import the module that owns the name"
    ]


def test_the_emulator_may_use_endpoint_facts_but_not_the_client() -> None:
    source = "from runner.endpoints import cost\nfrom runner.fal.client import QueueClient\n"
    assert violations(source, "runner.emulator.probe") == [
        "runner.emulator.probe:2: emulator imports runner.fal.client, a later stage (fal)"
    ]
