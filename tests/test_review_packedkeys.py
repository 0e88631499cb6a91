"""Attack review of packed job keys: every spelling a ledger may hold is found as a dict of
the text finds it (and nothing else is), sliced arrays and nulls pack as their values."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from runner.ledger import packedkeys
from runner.ledger.packedkeys import PackedKeys


def build(keys: list[str]) -> PackedKeys:
    ok, hi, lo = packedkeys.pack(pa.array(keys, pa.string()))
    rows = np.flatnonzero(ok)
    rows = rows[np.lexsort((lo[rows], hi[rows]))]
    others = pa.array([k for k, o in zip(keys, ok.tolist(), strict=True) if not o], pa.string())
    return PackedKeys(hi[rows], lo[rows], others)


def tricky(rng: random.Random, count: int) -> list[str]:
    hexes = [f"{rng.getrandbits(128):032x}" for _ in range(count)]
    shared = hexes[0][:16]
    keys = set(hexes)
    keys |= {shared + h[16:] for h in hexes[1:40]}  # one high half, many low halves
    keys |= {"0" * 32, "f" * 32, "0" * 16 + "f" * 16, "f" * 16 + "0" * 16}
    keys |= {"1" * 32, "12345678901234567890123456789012"}  # digits only
    keys |= {h.upper() for h in hexes[:30]}  # the same value spelled in capitals: other jobs
    keys |= {h[:31] + "G" for h in hexes[30:40]}
    keys |= {"0x" + h for h in hexes[40:50]} | {h[:30] for h in hexes[50:60]}
    keys |= {h[:16] + " " + h[17:] for h in hexes[60:70]}  # a space inside: 32 chars
    keys |= {h[:31] + "é" for h in hexes[70:80]}  # 32 characters, 33 bytes
    keys |= {h[:30] + "é" for h in hexes[80:90]}  # 31 characters, 32 bytes
    keys |= {"", "a", "row-1", "Ab" * 16, "aB" * 16}
    return sorted(keys)


def test_every_spelling_is_found_at_its_own_row() -> None:
    rng = random.Random(2)
    keys = tricky(rng, 400)
    index = build(keys)
    assert len(index) == len(keys)
    rows = [index.find(k) for k in keys]
    assert None not in rows and len(set(rows)) == len(keys)
    assert [index.key(r) for r in rows if r is not None] == keys
    assert index.keys(np.array(rows)) == keys


def test_look_alikes_of_held_keys_are_not_found() -> None:
    rng = random.Random(3)
    keys = tricky(rng, 300)
    index = build(keys[::2])
    held = set(keys[::2])
    for key in keys:
        assert (index.find(key) is not None) == (key in held), key
    for key in keys[::2]:
        for other in (key.upper(), key.lower(), key.swapcase(), key + "0", key[1:], "0" + key):
            assert (index.find(other) is not None) == (other in held), other


def test_a_sliced_array_with_nulls_packs_as_its_values() -> None:
    rng = random.Random(4)
    keys = [f"{rng.getrandbits(128):032x}" if i % 3 else f"x{i}" for i in range(50)]
    array = pa.array([None, *keys, None], pa.string())
    ok, hi, lo = packedkeys.pack(array.slice(1, 50))
    assert ok.tolist() == [i % 3 != 0 for i in range(50)]
    for key, good, h, low in zip(keys, ok.tolist(), hi.tolist(), lo.tolist(), strict=True):
        if good:
            assert packedkeys.unpack(h, low) == key
    ok, _, _ = packedkeys.pack(array.slice(50, 2))
    assert ok.tolist() == [True, False]  # the trailing null is not a key
