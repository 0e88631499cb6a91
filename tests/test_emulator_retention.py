"""Finished jobs are forgotten once their result retention has passed, on the injected clock.

An evicted id must answer exactly as an expired one always did (and as an unknown id does):
404 with fal's body and no ``x-fal-request-id``; the accounting still counts it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from runner.emulator.queue import Job, QueueModel
from runner.emulator.stats import canonical_input
from tests.emulator_support import JOB_CLOCK_S, SCALE, FakeClock, in_process, make_emulator

pytestmark = pytest.mark.anyio
LORA = "fal-ai/flux-lora"
RETENTION_S = 60.0  # emulated; 0.6 s on the clock at SCALE
RETENTION_CLOCK_S = RETENTION_S * SCALE
NOT_FOUND = (404, b'{"detail":"Request not found"}')
CANCEL_NOT_FOUND = (404, b'{"status":"NOT_FOUND"}')


def job(request_id: str, service_s: float = 1.0) -> Job:
    return Job(request_id, LORA, "fal-ai/flux-lora", submitted_at=0.0, service_s=service_s)


def test_scheduler_forgets_each_job_retention_after_it_ended() -> None:
    scheduler = QueueModel(concurrency=1, now=0.0, retention_s=5.0)
    for name in ("a", "b", "c"):
        scheduler.submit(job(name))  # one slot: they end at 1, 2 and 3
    assert [j.request_id for j in scheduler.advance(3.0)] == ["a", "b", "c"]
    assert set(scheduler.jobs) == {"a", "b", "c"}
    scheduler.advance(7.5)  # a (6.0) and b (7.0) are due, c (8.0) is not
    assert set(scheduler.jobs) == {"c"}
    assert scheduler.find("c", 7.999) is scheduler.jobs["c"]
    assert scheduler.find("c", 8.0) is None  # expired at the very instant it is forgotten
    assert scheduler.find("a", 7.5) is None
    scheduler.advance(8.0)
    assert scheduler.jobs == {}
    assert scheduler.ended_count == 3


def test_scheduler_keeps_jobs_in_flight_however_long() -> None:
    scheduler = QueueModel(concurrency=1, now=0.0, retention_s=1.0)
    scheduler.submit(job("long", service_s=100.0))
    scheduler.submit(job("queued"))
    scheduler.advance(50.0)
    assert set(scheduler.jobs) == {"long", "queued"}
    assert scheduler.find("queued", 50.0) is scheduler.jobs["queued"]


def test_scheduler_without_retention_keeps_everything() -> None:
    scheduler = QueueModel(concurrency=2, now=0.0)
    scheduler.submit(job("a"))
    scheduler.advance(1e12)
    assert scheduler.find("a", 1e12) is scheduler.jobs["a"]


async def _answers(client: httpx.AsyncClient, sub: dict[str, Any]) -> dict[str, Any]:
    """Every per-request route's answer: (status code, raw body, has x-fal-request-id)."""
    out = {}
    for kind, method, url in (
        ("status", "GET", sub["status_url"]),
        ("status_logs", "GET", sub["status_url"] + "?logs=1"),
        ("stream", "GET", sub["status_url"] + "/stream"),
        ("result", "GET", sub["response_url"]),
        ("cancel", "PUT", sub["cancel_url"]),
    ):
        response = await client.request(method, url)
        out[kind] = (response.status_code, response.content, "x-fal-request-id" in response.headers)
    return out


def _gone() -> dict[str, Any]:
    return {
        "status": (*NOT_FOUND, False),
        "status_logs": (*NOT_FOUND, False),
        "stream": (*NOT_FOUND, False),
        "result": (*NOT_FOUND, False),
        "cancel": (*CANCEL_NOT_FOUND, False),
    }


async def test_finished_jobs_are_evicted_after_retention_and_answer_as_expired() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, concurrency=2, result_retention_s=RETENTION_S)
    async with in_process(emu) as client:
        subs = [(await client.post(LORA, json={"prompt": f"p{i}"})).json() for i in range(4)]
        timed_out = (
            await client.post(LORA, json={"prompt": "late"}, headers={"X-Fal-Request-Timeout": "1"})
        ).json()
        cancelled = (await client.post(LORA, json={"prompt": "cancelled"})).json()
        await client.put(cancelled["cancel_url"])
        clock.advance(2.1 * JOB_CLOCK_S)  # every job has ended: 2 slots x 2 rounds
        done = await client.get(subs[-1]["response_url"])
        assert done.status_code == 200
        assert len(emu.scheduler.jobs) == 6

        clock.advance(RETENTION_CLOCK_S)
        # Expired but not yet swept (nothing advanced the queue): hidden all the same.
        assert len(emu.scheduler.jobs) == 6
        assert all(emu.lookup("fal-ai/flux-lora", s["request_id"]) is None for s in subs)
        unknown = {"status_url": "/fal-ai/flux-lora/requests/nope/status",
                   "response_url": "/fal-ai/flux-lora/requests/nope",
                   "cancel_url": "/fal-ai/flux-lora/requests/nope/cancel"}  # fmt: skip
        unknown_answers = await _answers(client, unknown)
        assert emu.scheduler.jobs == {}  # that request's advance swept them all
        evicted = [await _answers(client, s) for s in [*subs, timed_out, cancelled]]
        stats = (await client.get("/_emulator/stats")).json()
    assert unknown_answers == _gone()
    assert all(answers == _gone() for answers in evicted)
    assert stats["jobs"] == {
        "IN_QUEUE": 0,
        "IN_PROGRESS": 0,
        "COMPLETED": 6,
        "endings": {"succeeded": 4, "start_timeout": 1, "cancelled": 1},
    }
    assert stats["submits"]["accepted"] == 6


async def test_a_result_within_retention_is_kept_until_the_instant_it_expires() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, result_retention_s=RETENTION_S)
    async with in_process(emu) as client:
        sub = (await client.post(LORA, json={"prompt": "kept"})).json()
        clock.advance(JOB_CLOCK_S)
        first = await client.get(sub["response_url"])
        finished_at = emu.scheduler.jobs[sub["request_id"]].finished_at
        assert finished_at is not None
        clock.now = finished_at + RETENTION_CLOCK_S * 0.999
        before = await _answers(client, sub)
        late = await client.get(sub["response_url"])
        assert sub["request_id"] in emu.scheduler.jobs
        clock.now = finished_at + RETENTION_CLOCK_S
        after = await _answers(client, sub)
        assert emu.scheduler.jobs == {}
    assert (late.status_code, late.json()) == (200, first.json())
    assert before["status"][0] == before["result"][0] == 200 and before["result"][2]
    assert before["cancel"] == (400, b'{"status":"ALREADY_COMPLETED"}', False)
    assert after == _gone()


async def test_jobs_in_flight_are_never_evicted() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, result_retention_s=0.0)
    async with in_process(emu) as client:
        running = (await client.post(LORA, json={"prompt": "running"})).json()
        queued = (await client.post(LORA, json={"prompt": "queued"})).json()
        clock.advance(JOB_CLOCK_S / 2)
        answers = [await client.get(s["status_url"]) for s in (running, queued)]
    assert [a.status_code for a in answers] == [202, 202]
    assert [a.json()["status"] for a in answers] == ["IN_PROGRESS", "IN_QUEUE"]
    assert set(emu.scheduler.jobs) == {running["request_id"], queued["request_id"]}


async def test_stats_still_count_an_input_submitted_again_after_its_job_was_evicted() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, result_retention_s=RETENTION_S)
    body = {"prompt": "again", "seed": 3}
    async with in_process(emu) as client:
        await client.post(LORA, json=body)
        clock.advance(JOB_CLOCK_S + RETENTION_CLOCK_S)
        await client.post(LORA, json={"seed": 3, "prompt": "again"})  # same input, other order
        assert len(emu.scheduler.jobs) == 1  # the first one is gone
        stats = (await client.get("/_emulator/stats")).json()
    submits = stats["submits"]
    assert submits["by_input"] == {canonical_input(LORA, body): 2}
    assert (submits["accepted"], submits["distinct_inputs"], submits["duplicates"]) == (2, 1, 1)
