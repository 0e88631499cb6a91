"""Boolean masks between numpy and Arrow, for the batch reader's vector paths.

``pa.array(ndarray)`` asks numpy for ``np.ma.MaskedArray``, and numpy 2 imports ``numpy.ma``
on that first look: 16.5 ms of CPU, measured in a 10-job run, whose reader made its first
such mask there. Building the Arrow array from the packed bits never looks.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def to_numpy(mask: pa.Array) -> np.ndarray:
    """An Arrow boolean array as numpy booleans (nulls as False)."""
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def to_arrow(bools: np.ndarray) -> pa.BooleanArray:
    """numpy booleans as an Arrow boolean array without nulls (``pa.array(bools)``)."""
    bits = np.packbits(np.asarray(bools, dtype=bool), bitorder="little")
    buffers = [None, pa.py_buffer(bits)]
    array: pa.BooleanArray = pa.Array.from_buffers(pa.bool_(), len(bools), buffers)
    return array
