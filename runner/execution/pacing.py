"""When to look at a job again: a learned model of service times and a pure poll schedule.

fal-client polls every 0.1 s. The runner instead predicts when a job will finish from its
queue position and the service times seen so far, and asks once, a little after that: a
job of several seconds then costs one status call, not dozens.

The model keeps, per endpoint, an exponentially weighted mean and mean absolute deviation
of *seconds per work unit*, where a unit is one megapixel-step of one image. Polling aims
at ``mean + LATE_DEVS * deviation``: late enough that the first look usually finds the
job COMPLETED, early enough that the in-flight window (twice the slots) keeps fal's
slots busy while finished jobs wait to be noticed. For a job queued behind others the
deviation also holds the queue wait's: ``ahead / slots`` service times of unknown length
pass before it starts, so their deviation grows with the square root of that count.

``ahead / slots`` service times is the wait when the slots free up evenly spread in time.
When every job takes about the same time (deviation under ``ROUND_SPREAD`` of the mean)
they free up together and the queue moves in whole rounds: a queued job waits
``ahead // slots`` whole service times plus the rest of the round in service, up to one
more, which position and slots do not tell. The client cannot see the slots' phase, so
the model learns that remainder (:class:`QueueLag`) from what the first looks find: a look
that finds its job still running raises it, one that finds it done lowers it a little, so
that about ``early_share`` of first looks come early. With spread service times the
deviation margin already covers the wait and the lag stays near zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LATE_DEVS = 1.3
ROUND_SPREAD = 0.1  # deviation / mean below which the queue moves in rounds


@dataclass(slots=True)
class _Stat:
    mean: float
    dev: float
    n: int = 0


@dataclass(slots=True)
class QueueLag:
    """The queue wait that ``ahead / slots`` leaves out, in service times of a job ahead.

    A quantile tracker: each first look that finds its job still running adds ``step``;
    each that finds it done takes away ``step * early_share / (1 - early_share)``, so the
    lag settles where about ``early_share`` of first looks are early. It stays within
    ``[0, max_lag]``: the rest of a round in service is at most one service time.
    """

    early_share: float = 0.02
    step: float = 0.05
    first_step: float = 0.4
    max_lag: float = 1.0
    lag: float = 0.0
    early: int = 0
    looks: int = 0

    def first_look(self, *, done: bool, aimed: float | None = None) -> None:
        """What a first look found; ``aimed``: the lag it was aimed with (default: now's).

        An early look raises the lag to a step above the one it was aimed with, not above
        the current one: looks aimed before an earlier raise, and coming back early for
        that, carry no news, and raising for each of them overshoots.
        """
        step = max(self.step, self.first_step / math.sqrt(1 + self.looks))
        self.looks += 1
        if done:
            down = step * self.early_share / (1.0 - self.early_share)
            self.lag = max(0.0, self.lag - down)
        else:
            self.early += 1
            base = self.lag if aimed is None else min(aimed, self.lag)
            self.lag = min(self.max_lag, max(self.lag, base + step))


@dataclass(slots=True)
class ServiceModel:
    """Seconds per work unit and queue wait per position, learned as the run goes."""

    prior_per_unit_s: float = 0.12  # about 3.4 s for a 1 MP, 28-step image
    alpha: float = 0.15
    _per_unit: dict[str, _Stat] = field(default_factory=dict)
    # Seconds per job, whatever its size or endpoint: what the requests queued ahead of a
    # job hold the slots for. A job's own mean is the wrong measure of them when a
    # manifest mixes sizes (a small job behind big ones waits longer than its own size says).
    _per_job: _Stat | None = None
    lag: QueueLag = field(default_factory=QueueLag)

    @staticmethod
    def units(megapixels: float, steps: int, images: int) -> float:
        return max(megapixels, 0.05) * max(steps, 1) * max(images, 1)

    def observe(self, endpoint: str, units: float, service_s: float) -> None:
        per_unit = service_s / max(units, 1e-9)
        stat = self._per_unit.get(endpoint)
        if stat is None:
            self._per_unit[endpoint] = _Stat(mean=per_unit, dev=per_unit * 0.25, n=1)
        else:
            self._update(stat, per_unit)
        if self._per_job is None:
            self._per_job = _Stat(mean=service_s, dev=service_s * 0.25, n=1)
        else:
            self._update(self._per_job, service_s)

    def _update(self, stat: _Stat, value: float) -> None:
        a = max(self.alpha, 1.0 / (stat.n + 1))  # average plainly until enough samples
        err = value - stat.mean
        stat.mean += a * err
        stat.dev += a * (abs(err) - stat.dev)
        stat.n += 1

    def job_mean_s(self) -> float | None:
        """Mean seconds per job over every endpoint (None before the first is seen)."""
        return None if self._per_job is None else self._per_job.mean

    def ahead_s(self, own_mean_s: float) -> float:
        """Mean seconds a request queued ahead holds a slot (before any: ``own_mean_s``)."""
        return own_mean_s if self._per_job is None else self._per_job.mean

    def lag_s(self, own_mean_s: float) -> float:
        """Seconds of queue wait beyond ``ahead / slots`` service times (see QueueLag)."""
        return self.lag.lag * self.ahead_s(own_mean_s)

    def ahead_dev_s(self, own_dev_s: float) -> float:
        """Deviation of the seconds a request queued ahead holds a slot."""
        return own_dev_s if self._per_job is None else self._per_job.dev

    def service_s(self, endpoint: str, units: float) -> tuple[float, float]:
        """(mean, deviation) of the service time of a job of ``units``."""
        stat = self._per_unit.get(endpoint)
        if stat is None:
            mean = self.prior_per_unit_s * units
            return mean, mean * 0.5
        return stat.mean * units, stat.dev * units

    def known(self, endpoint: str) -> bool:
        return endpoint in self._per_unit


def first_poll_delay_s(
    *,
    position: int | None,
    service_mean_s: float,
    service_dev_s: float,
    slots: int,
    min_s: float,
    max_s: float,
    ahead_mean_s: float | None = None,
    ahead_dev_s: float | None = None,
    lag_s: float = 0.0,
) -> float:
    """Delay until the first status call after submit (``position``: from the ack).

    ``ahead_mean_s`` and ``ahead_dev_s`` describe the service times of the requests queued
    ahead (default: this job's own); ``lag_s`` is the learned rest of the round in service
    (:meth:`ServiceModel.lag_s`).
    """
    ahead = 0 if position is None else max(position, 0)
    # `ahead` requests wait before this one; slots free up at slots/mean per second.
    wait, wait_dev = queue_wait_s(
        ahead, slots, service_mean_s, service_dev_s, ahead_mean_s, ahead_dev_s
    )
    dev = math.hypot(service_dev_s, wait_dev)
    return _clamp(wait + lag_s + service_mean_s + LATE_DEVS * dev, min_s, max_s)


def next_poll_delay_s(
    *,
    state: str,
    position: int | None,
    running_for_s: float,
    polls: int,
    service_mean_s: float,
    service_dev_s: float,
    slots: int,
    min_s: float,
    max_s: float,
    ahead_mean_s: float | None = None,
    ahead_dev_s: float | None = None,
    lag_s: float = 0.0,
) -> float:
    """Delay until the next status call, given what the last one said.

    ``state`` is ``IN_QUEUE`` or ``IN_PROGRESS``; ``running_for_s`` is how long the job has
    been seen running (0 when it was just seen start); ``polls`` counts earlier status calls,
    so a job that keeps surprising the model is looked at with a growing interval.
    """
    if state == "IN_QUEUE":
        ahead = max(position or 0, 0) + 1
        wait, wait_dev = queue_wait_s(
            ahead, slots, service_mean_s, service_dev_s, ahead_mean_s, ahead_dev_s
        )
        spread = LATE_DEVS * math.hypot(service_dev_s, wait_dev)
        target = wait + lag_s + service_mean_s + spread
    else:
        remaining = service_mean_s + LATE_DEVS * service_dev_s - running_for_s
        # Past the expected end: back off geometrically from a fraction of the mean.
        overdue = service_mean_s * 0.25 * (1.5 ** min(polls, 8))
        target = remaining if remaining > min_s else overdue
    return _clamp(target, min_s, max_s)


def explore_delay_s(*, polls: int, min_s: float, max_s: float, base_s: float = 0.1) -> float:
    """Before the model has seen one job of an endpoint: look early, then less often.

    ``base_s * 2**polls`` (0.1, 0.2, 0.4, ... s): a few extra calls for the first jobs of a
    run buy a model learned from a real completion instead of a guessed prior.
    """
    return _clamp(base_s * 2.0 ** min(polls, 16), min_s, max_s)


def queue_wait_s(
    ahead: int,
    slots: int,
    own_mean_s: float,
    own_dev_s: float,
    ahead_mean_s: float | None,
    ahead_dev_s: float | None,
) -> tuple[float, float]:
    """(mean, deviation) of the wait for ``ahead`` queued requests over ``slots`` slots."""
    per_mean = own_mean_s if ahead_mean_s is None else ahead_mean_s
    per_dev = own_dev_s if ahead_dev_s is None else ahead_dev_s
    rounds = ahead / max(slots, 1)
    if per_dev < ROUND_SPREAD * per_mean:
        # Jobs of one length: the slots free up together, so the queue moves in whole
        # rounds, and the rest of the round in service is the learned lag.
        rounds = float(ahead // max(slots, 1))
    return rounds * per_mean, math.sqrt(rounds) * per_dev


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)
