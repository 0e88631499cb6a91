"""Jobs fulfilled from the cross-run cache (``--cache DIR``, :mod:`runner.media.cache`).

A job may be reused when the manifest fixes its seed, its endpoint is assumed deterministic
(:meth:`runner.config.RunConfig.deterministic`: an assumption, fal does not promise it), and
outputs are downloaded. Its key is the endpoint and the request as it would be sent, with
local files by the hash of their bytes and a re-roll's seed in place
(:func:`runner.execution.flagged.reseeded`). A job without a seed is never looked up: fal
picks a random one, so no earlier output is "the" output of that request.

On a hit the files are copied where downloads go and the job is recorded completed at $0,
with the run directory and request id the outputs came from; nothing is uploaded or sent.
On a miss the job runs as usual, and its outputs, once downloaded and if not flagged, are
filed under the same key by the download stage. A roll re-rolled under ``--flagged reroll``
leaves a flag mark under its key (:meth:`Reuse.mark_flagged`); a later lookup under the same
policy steps over marks to the next roll's key (:meth:`Reuse.lookup`), so a cached run whose
first rolls were flagged is served the re-rolled outputs at $0 too.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import anyio

from runner.config import RunConfig
from runner.endpoints.cost import megapixels
from runner.execution.flagged import reseeded
from runner.execution.outcome import Cached
from runner.execution.recorder import Ticket
from runner.media.cache import CacheEntry, CacheSlot, OutputCache, cache_key, keyed_payload
from runner.media.sink import OutputSink


class Reuse:
    """The cache as one run uses it: which jobs may be reused, the lookup, the copy."""

    def __init__(self, cache: OutputCache, sink: OutputSink, config: RunConfig) -> None:
        self.cache = cache
        self.sink = sink
        self.config = config
        self.manifest_dir = config.manifest.resolve().parent

    def eligible(self, t: Ticket) -> bool:
        job = t.job
        return (
            job.request is not None
            and job.payload.get("seed") is not None
            and self.config.deterministic(job.endpoint)
        )

    async def lookup(self, t: Ticket) -> tuple[Ticket, CacheSlot | None, Cached | None]:
        """This attempt's ticket, cache slot (None: not reusable) and, on a hit, its outputs.

        Under ``--flagged reroll`` a flag mark moves the ticket on to the next roll (as the
        run would, without paying for the flagged one), up to ``--max-rerolls``."""
        while True:
            slot = await self.slot(t)
            if slot is None:
                return t, None, None
            entry = await anyio.to_thread.run_sync(self.cache.lookup, slot.key)
            if entry is not None and entry.flagged and entry.endpoint == t.job.endpoint:
                if self.config.flagged == "reroll" and t.reroll < self.config.max_rerolls:
                    t = replace(t, reroll=t.reroll + 1, reattach=None)
                    continue
                return t, slot, None
            return t, slot, None if entry is None else await self.fulfil(t, slot, entry)

    async def mark_flagged(self, slot: CacheSlot, seed: int | None) -> None:
        """Leave a flag mark under ``slot``: this roll's output was flagged and re-rolled."""
        mark = functools.partial(self.cache.mark_flagged, slot.key, endpoint=slot.endpoint,
                                 seed=seed, request_id=slot.request_id)  # fmt: skip
        await anyio.to_thread.run_sync(mark)

    async def slot(self, t: Ticket) -> CacheSlot | None:
        """The key this attempt's outputs are filed under, or None when it may not be reused
        (or a local input cannot be read: the submit path then reports that)."""
        if not self.eligible(t):
            return None
        payload = reseeded(t, t.job.payload)
        try:
            keyed = await anyio.to_thread.run_sync(keyed_payload, payload, self.manifest_dir)
        except OSError:
            return None
        return CacheSlot(cache_key(t.job.endpoint, keyed), t.job.endpoint, None)

    async def fulfil(self, t: Ticket, slot: CacheSlot, entry: CacheEntry) -> Cached | None:
        """The job's outputs copied from the cache, or None on a miss."""
        if entry.endpoint != t.job.endpoint or entry.flagged or not entry.files:
            return None
        outputs = await self.cache.fulfil(entry, self.sink, row_id=t.job.row_id,
                                          job_key=t.job.job_key)  # fmt: skip
        if outputs is None:
            return None
        return Cached(
            outputs=outputs, seed=entry.seed,
            megapixels=sum(megapixels(w, h) for w, h in entry.sizes if w and h),
            source_run=entry.source_run, source_request=entry.source_request,
        )  # fmt: skip


def open_reuse(config: RunConfig, sink: OutputSink | None) -> Reuse | None:
    """The run's cache, when ``--cache`` is given and outputs are downloaded."""
    if config.cache_dir is None or sink is None or not config.download:
        return None
    root = Path(config.cache_dir).expanduser()
    return Reuse(OutputCache(root, config.run_dir), sink, config)
