"""runner.libc: malloc's arena cap, in a child process (it is process-wide and one-way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from runner import libc

pytestmark = pytest.mark.skipif(not libc.available(), reason="glibc's malloc only")

# Eight threads allocate at once (a barrier keeps them all alive), then the child counts
# glibc's thread heaps: anonymous read-write mappings at a 64 MiB boundary (HEAP_MAX_SIZE
# on 64-bit), where glibc places every arena but the main one.
_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    from runner import libc
    capped = libc.limit_arenas() if sys.argv[1] == "cap" else False
    barrier = threading.Barrier(9)  # the eight and this thread
    kept = []
    def work():
        kept.append([bytes(100_000) for _ in range(4)])  # malloc's heap, not mmap
        barrier.wait()
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    barrier.wait()  # every thread has allocated and is still alive
    heaps = 0
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            start = int(fields[0].split("-")[0], 16)
            if fields[1] == "rw-p" and len(fields) == 5 and start % (64 << 20) == 0:
                heaps += 1
    barrier.wait()
    for t in threads:
        t.join()
    print(json.dumps({"capped": capped, "heaps": heaps}))
    """
)


def _child(mode: str, env: dict[str, str] | None = None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | (env or {})
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_capped_threads_share_one_heap_where_uncapped_ones_take_one_each() -> None:
    uncapped, capped = _child("free"), _child("cap")
    assert capped == {"capped": True, "heaps": 1}
    assert uncapped["capped"] is False
    assert isinstance(uncapped["heaps"], int) and uncapped["heaps"] >= 4, uncapped


def test_the_users_malloc_arena_max_wins() -> None:
    result = _child("cap", {"MALLOC_ARENA_MAX": "8"})
    assert result["capped"] is False
    assert isinstance(result["heaps"], int) and result["heaps"] >= 4, result


@pytest.mark.parametrize(("call", "caps"), [("main()", True), ("main(['--version'])", False)])
def test_the_command_line_caps_the_arenas_before_its_threads_start(call: str, caps: bool) -> None:
    # The program's entry point (no argv) caps; main(argv) from a test leaves its process be.
    code = (
        "import sys, runner.cli as cli\n"
        "cli.limit_arenas = lambda: print('capped') or True\n"
        "sys.argv = ['runner', '--version']\n"
        f"try:\n    cli.{call}\nexcept SystemExit:\n    pass\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ("capped" in out.stdout.splitlines()) is caps, out.stdout
