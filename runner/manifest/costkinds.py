"""Rows of a batch grouped by what their cost depends on: one request for each kind.

``validate`` and ``plan`` count plain rows without making their jobs; ``plan`` prices them by
kind of cost (the fields :func:`runner.endpoints.cost.estimate` reads), with one request made
and validated for each kind in the whole manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.endpoints import catalog
from runner.endpoints.catalog import BaseRequest
from runner.manifest import vector

# What an estimate reads of a request (runner.endpoints.cost.estimate): rows alike in these
# cost alike, so one request is validated per group.
COST_FIELDS = ("num_images", "image_size", "resolution_mode", "image_url", "mask_url", "loras")
# Of those, fields whose cost is whether they are given (an input URL's size is unknown until
# probed; a remote LoRA's size is unknown, so the estimate assumes the largest surcharge).
_GIVEN_FIELDS = frozenset({*vector.FILE_FIELDS, "loras"})


@dataclass
class CostGroup:
    """``count`` jobs of one endpoint that cost what ``request`` costs (no local file)."""

    endpoint: str
    count: int
    request: BaseRequest | None


def cost_groups(
    group: vector.Typed,
    counted: np.ndarray,
    request_fields: Callable[[int], dict[str, Any]],
    requests: dict[Any, BaseRequest],
) -> list[CostGroup]:
    """The counted rows grouped by what their estimate reads, one request for each group.

    ``request_fields(at)``: the request body of the group's row ``at``; ``requests``: the
    requests made so far, by kind (kept for the whole manifest).
    """
    where = np.flatnonzero(counted)
    taken = None if len(where) == len(counted) else pa.array(where)
    # Each row's kind as one integer: the codes of its cells in the fields the estimate reads.
    codes = np.zeros(len(where), dtype=np.int64)
    names: list[str] = []
    cells: list[tuple[list[Any], np.ndarray]] = []
    for name in COST_FIELDS:
        if name not in group.fields:
            continue
        values = group.fields[name] if taken is None else group.fields[name].take(taken)
        if name in _GIVEN_FIELDS:
            distinct: list[Any] = [False, True]
            part = np.asarray(pc.is_valid(values).to_numpy(zero_copy_only=False), np.int64)
        else:
            encoded = pc.dictionary_encode(values, null_encoding="encode")
            distinct = encoded.dictionary.to_pylist()
            part = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        codes = codes * len(distinct) + part
        names.append(name)
        cells.append((distinct, part))
    _, firsts, counts = np.unique(codes, return_index=True, return_counts=True)
    found = []
    for first, count in zip(firsts.tolist(), counts.tolist(), strict=True):
        # Rows alike in what the estimate reads cost alike: one request for each such kind
        # in the whole manifest, not in each block.
        values = tuple(distinct[part[first]] for distinct, part in cells)
        kind = (group.endpoint, tuple(names), values)
        request = requests.get(kind)
        if request is None:
            payload = request_fields(int(where[first]))
            request = requests[kind] = catalog.parse_request(group.endpoint, payload)
        found.append(CostGroup(group.endpoint, count, request))
    return found
