import random
from typing import TypedDict

import pytest

from runner.execution.completion import ResultFirst, ResultIn
from runner.execution.pacing import (
    QueueLag,
    ServiceModel,
    first_poll_delay_s,
    next_poll_delay_s,
)


class Shape(TypedDict):
    """The service and clamp arguments both delay functions share."""

    service_mean_s: float
    service_dev_s: float
    slots: int
    min_s: float
    max_s: float


def test_model_learns_mean_per_unit_from_observations() -> None:
    m = ServiceModel(prior_per_unit_s=1.0)
    assert m.service_s("e", 10) == (10.0, 5.0)  # the prior, before any observation
    for s in (4.0, 6.0, 5.0, 5.0):
        m.observe("e", 10, s)
    mean, dev = m.service_s("e", 10)
    assert mean == pytest.approx(5.0, abs=0.3)
    assert 0 < dev < 2
    # Twice the work, twice the time.
    assert m.service_s("e", 20)[0] == pytest.approx(2 * mean)


def test_units_grow_with_megapixels_steps_and_images() -> None:
    units = ServiceModel.units
    assert units(1, 28, 1) < units(2, 28, 1) < units(2, 28, 2)


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        (None, 5.0 + 1.3),  # just submitted, a slot free
        (0, 5.0 + 1.3),
        # Four ahead, two slots: two service times of waiting, whose deviation (sqrt(2) x
        # 1.0) adds to this job's own in quadrature.
        (4, 4 * 5.0 / 2 + 5.0 + 1.3 * 3**0.5),
    ],
)
def test_first_poll_aims_after_expected_completion(position: int | None, expected: float) -> None:
    d = first_poll_delay_s(
        position=position, service_mean_s=5.0, service_dev_s=1.0, slots=2, min_s=0.1, max_s=60
    )
    assert d == pytest.approx(expected)


def test_delays_are_clamped() -> None:
    kw = Shape(service_mean_s=500.0, service_dev_s=1.0, slots=1, min_s=0.1, max_s=30.0)
    assert first_poll_delay_s(position=0, **kw) == 30.0
    kw = Shape(service_mean_s=0.0, service_dev_s=0.0, slots=1, min_s=0.1, max_s=30.0)
    assert first_poll_delay_s(position=0, **kw) == 0.1


def test_running_job_is_polled_at_its_expected_end_then_backs_off() -> None:
    kw = Shape(service_mean_s=4.0, service_dev_s=0.0, slots=1, min_s=0.1, max_s=60.0)
    assert (
        next_poll_delay_s(state="IN_PROGRESS", position=None, running_for_s=1.0, polls=1, **kw)
        == 3.0
    )
    overdue = [
        next_poll_delay_s(state="IN_PROGRESS", position=None, running_for_s=9.0, polls=p, **kw)
        for p in (1, 2, 3)
    ]
    assert overdue == sorted(overdue) and overdue[0] < overdue[-1]


def test_queued_job_waits_in_proportion_to_its_position() -> None:
    kw = Shape(service_mean_s=2.0, service_dev_s=0.0, slots=2, min_s=0.1, max_s=600.0)
    near = next_poll_delay_s(state="IN_QUEUE", position=0, running_for_s=0, polls=1, **kw)
    far = next_poll_delay_s(state="IN_QUEUE", position=10, running_for_s=0, polls=1, **kw)
    assert far - near == pytest.approx(10 * 2.0 / 2)


def test_before_any_observation_polls_start_early_and_double() -> None:
    from runner.execution.pacing import explore_delay_s

    delays = [explore_delay_s(polls=p, min_s=0.05, max_s=2.0) for p in range(7)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == 2.0


def test_the_queue_ahead_is_measured_in_whole_jobs_not_this_jobs_size() -> None:
    m = ServiceModel()
    assert m.ahead_s(3.0) == 3.0  # nothing seen yet: this job's own mean
    for units, seconds in ((1, 1.0), (10, 10.0), (1, 1.0), (10, 10.0)):
        m.observe("e", units, seconds)
    small, _ = m.service_s("e", 1)
    assert small == pytest.approx(1.0)
    # The jobs ahead of a small one are a mix of small and big: about 5.5 s each.
    assert 4.0 < m.ahead_s(small) < 7.0
    kw = Shape(service_mean_s=small, service_dev_s=0.0, slots=2, min_s=0.01, max_s=600.0)
    own = first_poll_delay_s(position=4, **kw)
    mixed = first_poll_delay_s(position=4, ahead_mean_s=m.ahead_s(small), **kw)
    assert own == pytest.approx(4 * 1.0 / 2 + 1.0)
    assert mixed == pytest.approx(4 * m.ahead_s(small) / 2 + 1.0)
    queued = next_poll_delay_s(
        state="IN_QUEUE", position=3, running_for_s=0, polls=1, ahead_mean_s=6.0, **kw
    )
    assert queued == pytest.approx(4 * 6.0 / 2 + 1.0)


def test_a_longer_queue_ahead_widens_the_margin_not_only_the_wait() -> None:
    kw = Shape(service_mean_s=4.0, service_dev_s=1.0, slots=10, min_s=0.01, max_s=600.0)
    margins = []
    for ahead in (0, 10, 40):
        delay = first_poll_delay_s(position=ahead, ahead_mean_s=4.0, ahead_dev_s=2.0, **kw)
        margins.append(delay - ahead * 4.0 / 10 - 4.0)
    # 1.3 x hypot(1, 2 x sqrt(ahead / 10)): 1.3, 2.91, 5.36.
    assert margins == pytest.approx([1.3, 1.3 * 5**0.5, 1.3 * 17**0.5])
    queued = next_poll_delay_s(
        state="IN_QUEUE", position=9, running_for_s=0, polls=1, ahead_dev_s=2.0, **kw
    )
    assert queued == pytest.approx(10 * 4.0 / 10 + 4.0 + 1.3 * 5**0.5)


def test_job_mean_is_none_until_a_job_is_seen_then_follows_every_endpoint() -> None:
    model = ServiceModel(alpha=0.5)
    assert model.job_mean_s() is None
    model.observe("a", units=1.0, service_s=2.0)
    assert model.job_mean_s() == pytest.approx(2.0)
    model.observe("b", units=10.0, service_s=4.0)  # another endpoint, counted alike
    assert model.job_mean_s() == pytest.approx(3.0)


def test_the_learned_lag_moves_the_queued_looks_and_stays_within_one_service_time() -> None:
    kw = Shape(service_mean_s=2.0, service_dev_s=0.0, slots=4, min_s=0.01, max_s=600.0)
    base = first_poll_delay_s(position=6, **kw)
    assert first_poll_delay_s(position=6, lag_s=0.7, **kw) == pytest.approx(base + 0.7)
    queued = next_poll_delay_s(state="IN_QUEUE", position=6, running_for_s=0, polls=1, **kw)
    lagged = next_poll_delay_s(
        state="IN_QUEUE", position=6, running_for_s=0, polls=1, lag_s=0.7, **kw
    )
    assert lagged == pytest.approx(queued + 0.7)
    model = ServiceModel()
    model.observe("e", 1.0, 2.0)
    assert model.lag_s(2.0) == 0.0
    for _ in range(100):
        model.lag.first_look(done=False)
    assert model.lag.lag == 1.0 and model.lag_s(2.0) == pytest.approx(2.0)  # the cap
    for _ in range(1000):
        model.lag.first_look(done=True)
    assert model.lag.lag == 0.0


def _first_looks(model: ServiceModel, queue: str, looks: int, seed: int) -> tuple[float, float]:
    """Share of first looks that come early, and their mean lateness in service times.

    A simulated queue with an injected clock: ``lockstep``, every job takes T and the slots
    free up together at whole rounds, and a job is submitted up to 0.3 T into a round (as
    its predecessors are noticed) behind ``slots`` to ``2 slots`` others; ``staggered``, jobs
    take 0.6-1.4 T and the slots free up evenly spread with a random phase.
    """
    rng = random.Random(seed)
    slots, service = 8, 1.0
    early, late = 0, 0.0
    for k in range(looks):
        position = rng.randrange(slots, 2 * slots)
        if queue == "lockstep":
            submitted = k * service + rng.uniform(0, 0.3) * service
            ends = (k + 1 + position // slots) * service + service
        else:
            submitted = k * service + rng.uniform(0, 1) * service
            own = rng.uniform(0.6, 1.4) * service
            ends = submitted + (position + 1 - rng.random()) * service / slots + own
        mean, dev = model.service_s("e", 1.0)
        mean = service  # the simulated queue's, whatever the model's last update said
        look = submitted + first_poll_delay_s(
            position=position, service_mean_s=mean, service_dev_s=dev, slots=slots,
            min_s=0.01, max_s=600.0, lag_s=model.lag_s(mean),
        )  # fmt: skip
        model.lag.first_look(done=look >= ends)
        early += look < ends
        late += max(look - ends, 0.0) / service
    return early / looks, late / looks


@pytest.mark.parametrize("queue", ["lockstep", "staggered"])
def test_first_looks_land_after_the_end_in_rounds_and_stay_near_it_when_spread(
    queue: str,
) -> None:
    model, unlearned = ServiceModel(), ServiceModel(lag=QueueLag(step=0.0, first_step=0.0))
    for k in range(20):
        # In rounds every job takes the same time (the deviation dies away); spread, they
        # vary (mean 1 s, deviation about 0.4 s).
        seconds = 1.0 if queue == "lockstep" else 0.6 + 0.8 * (k % 2)
        model.observe("e", 1.0, seconds)
        unlearned.observe("e", 1.0, seconds)
    before, late_before = _first_looks(unlearned, queue, 400, seed=1)
    _first_looks(model, queue, 400, seed=2)  # learn
    after, lateness = _first_looks(model, queue, 400, seed=3)
    assert after <= 0.1
    if queue == "lockstep":
        # Whole rounds ahead, but not the rest of the round in service: every look early.
        # Learned, that rest puts the looks just after the end (the round's phase is
        # unknown, so up to the 0.3 T of spread in the submits).
        assert before > 0.9 and 0.5 < model.lag.lag <= 1.0 and lateness < 0.3
    else:
        # Spread slots and sizes: the deviation already covers the wait, no lag is needed
        # and the looks come no later for it.
        assert model.lag.lag < 0.1 and lateness <= late_before + 0.01


@pytest.mark.anyio
async def test_a_queued_job_waits_for_the_model_without_calls_then_looks_once() -> None:
    from tests.fakes import FakeTime
    from tests.test_completion import DONE, FakeQueue, poller, watch

    queue, time = FakeQueue([DONE]), FakeTime(now=100.0)
    p = poller(queue, time, ResultFirst())  # two slots
    sleep = time.sleep

    async def learning_sleep(seconds: float) -> None:
        await sleep(seconds)
        if time.now >= 101.0 and not p.pacing.model.known("fal-ai/flux-lora"):
            p.pacing.model.observe("fal-ai/flux-lora", 1.0, 1.0)  # a job ahead finished

    p.reader.sleep = learning_sleep
    w = watch()
    w.position, w.submitted_s = 4, 100.0
    assert isinstance(await p.wait(w), ResultIn)
    assert queue.calls == {"result": 1}  # no exploring looks while the model was unknown
    # Four ahead on two slots, then its own second, from the submit, plus the margin
    # (the first sample's deviation is a quarter of it).
    assert time.now == pytest.approx(100.0 + 2.0 + 1.0 + 1.3 * 0.25 * 3**0.5)
    assert p.pacing.model.lag.looks == 1 and p.pacing.model.lag.early == 0


@pytest.mark.anyio
async def test_an_early_first_look_raises_the_lag_and_a_later_look_does_not_count() -> None:
    from tests.fakes import FakeTime
    from tests.test_completion import DONE, RUNNING, FakeQueue, poller, watch

    queue, time = FakeQueue([RUNNING, RUNNING, DONE]), FakeTime()
    p = poller(queue, time, ResultFirst())
    p.pacing.model.observe("fal-ai/flux-lora", 1.0, 1.0)
    assert isinstance(await p.wait(watch()), ResultIn)
    lag = p.pacing.model.lag
    assert (lag.looks, lag.early) == (1, 1) and lag.lag == pytest.approx(
        lag.first_step
    )  # the first step is the largest
