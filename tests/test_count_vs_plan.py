"""The bar's count against ``runner plan``'s: the same jobs, bad rows and dollars."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.endpoints.cost import PriceTable
from runner.execution.jobsource import ManifestSource, Pricer, expand_options
from runner.manifest.batches import iter_job_batches
from runner.manifest.plan import build_plan_batches
from runner.media.inputs import InputSizer
from tests.scenario import run_config

pytestmark = pytest.mark.anyio

DUPLICATE_ID = """id,endpoint,prompt,image_size,seed
a1,fal-ai/flux-lora,a cat,square_hd,1
a1,fal-ai/flux-lora,a dog,square_hd,2
a2,fal-ai/flux-lora,a cow,square_hd,3
"""


async def test_the_bars_count_and_dollars_equal_plans_with_a_duplicate_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.csv"
    path.write_text(DUPLICATE_ID)
    config = run_config(path, tmp_path / "run")
    sizer = InputSizer(tmp_path)
    prices = PriceTable.default()
    bar = await ManifestSource(config).count(Pricer(prices, sizer))
    batches = iter_job_batches(path, None, expand_options(config), materialize=False)
    plan = build_plan_batches(batches, prices, input_sizes=sizer, lora_bytes=sizer.lora_bytes)
    assert plan.total.jobs == 2 and plan.bad_rows == 1
    assert bar == (plan.total.jobs + plan.bad_rows, plan.total.usd)
