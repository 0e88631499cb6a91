"""What a run does with an output fal's safety checker flagged (``--flagged keep|reroll|fail``).

FLUX answers an image its safety checker flags with a black picture and ``true`` in the
result's ``has_nsfw_concepts``; fal bills it all the same. The policies:

    keep     the default: the output is kept as it is, marked ``flagged`` in the ledger and
             counted in the summary
    reroll   the job is submitted again with a new seed, :func:`reroll_seed` of its key and
             the re-roll's number (pure: a rerun re-rolls to the same seeds), up to
             ``--max-rerolls`` times. Each re-roll is an attempt of its own: the flagged one
             is recorded paid and discarded (its cost in the job's ``reroll_usd``), and the
             next reserves the job's estimate again, so the budget sees every re-roll. When
             the re-rolls run out, or the budget refuses one, the last output is kept,
             flagged and counted.
    fail     the job fails with ``error_type="flagged"``, its cost recorded (it was paid).

A flagged output is never filed in the cross-run cache. Nothing here touches the ledger
directly: the recorder writes what these functions decide.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any

from runner.config import RunConfig
from runner.execution.outcome import Done, Failed, Failure, Outcome
from runner.execution.recorder import Recorder, Ticket

FLAGGED = "flagged"  # the error_type of a job failed, or an attempt re-rolled, for it
SEED_RANGE = 2**31  # seeds FLUX accepts (a 32-bit signed int, as fal's own random ones)


def reroll_seed(job_key: str, reroll: int) -> int:
    """The seed of a job's ``reroll``-th re-roll (1-based). Pure."""
    digest = hashlib.sha256(f"{job_key}/reroll/{reroll}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


def reseeded(t: Ticket, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """What a re-roll sends: ``payload`` with the re-roll's seed; the payload itself for
    the job's first roll."""
    if t.reroll == 0:
        return payload
    return {**payload, "seed": reroll_seed(t.job.job_key, t.reroll)}


def flagged_failure(done: Done, estimate_usd: Decimal | None = None) -> Failed:
    """``--flagged fail``: the job failed for its flagged outputs; paid all the same (the
    estimate, when the outputs' price is unknown)."""
    n, of = done.flagged_images, len(done.success.outputs)
    seed = done.success.result.seed
    message = f"fal's safety checker flagged {n} of {of} images (seed {seed}); --flagged fail"
    billed = done.billed_usd if done.billed_usd is not None else estimate_usd
    return Failed(Failure(FLAGGED, message, retryable=False), billed_usd=billed, flagged_images=n)


async def judge(
    t: Ticket, attempt: int, done: Done, *, config: RunConfig, recorder: Recorder
) -> tuple[Outcome | None, Ticket]:
    """What a completed attempt becomes under ``--flagged``: the outcome to record, or None
    when it was re-rolled (recorded, the next attempt's estimate reserved) with the ticket
    the next attempt goes with."""
    if not done.flagged_images:
        return done, t
    kept = replace(done, cache=None)
    if config.flagged == "fail":
        return flagged_failure(done, t.estimate.usd), t
    if config.flagged == "keep" or t.reroll >= config.max_rerolls:
        return kept, t
    cost = await recorder.reroll(t, attempt, done)
    if cost is None:
        return kept, t  # the budget refused another roll: the last output stands
    # The next roll was admitted by this run's budget, whatever admitted the job.
    rolled = replace(t, reroll=t.reroll + 1, reroll_usd=t.reroll_usd + cost)
    return None, replace(rolled, reattach=None, settle_only=False)
