"""The bar's count: the manifest priced as ``runner plan`` prices it (rows alike once, plain
rows counted, not made) gives the count and dollars of making and pricing every job that
admission makes (a repeated id a bad row)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from runner.endpoints.cost import PriceTable
from runner.execution.jobsource import ManifestSource, Pricer, count_jobs, job_stream
from runner.media.inputs import InputSizer
from tests.scenario import run_config

pytestmark = pytest.mark.anyio

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"

ODD = """id,endpoint,prompt,image_size,seed,seeds,num_images,loras,image_url
a1,fal-ai/flux-lora,plain,square,1,,,,
a1,fal-ai/flux-lora,duplicate id,square,2,,,,
,fal-ai/flux-lora,no id,landscape_4_3,3,,2,,
b2,fal-ai/flux-lora,three seeds,square,,1;2;3,,,
c3,fal-ai/flux-lora,bad size,huge,4,,,,
d4,fal-ai/flux-lora,a lora,square,5,,,https://example.com/l.safetensors:0.7,
e5,fal-ai/flux-lora/image-to-image,local input,,6,,,,images/chair.jpg
f6,fal-ai/no-such-endpoint,unknown,square,7,,,,
g7,fal-ai/flux-lora,too many,square,8,,99,,
"""


def manifest_cases(tmp_path: Path) -> list[Path]:
    shutil.copytree(MANIFESTS / "images", tmp_path / "images")
    odd = tmp_path / "odd.csv"
    odd.write_text(ODD)
    return [MANIFESTS / "demo.csv", MANIFESTS / "mixed.csv", odd]


async def test_the_count_prices_rows_alike_once_and_agrees_with_every_job(
    tmp_path: Path,
) -> None:
    for path in manifest_cases(tmp_path):
        config = run_config(path, tmp_path / f"{path.stem}.runner")
        pricer = Pricer(PriceTable.default(), InputSizer(path.resolve().parent))
        # Admission's own stream: a repeated id is a bad row there, never sent.
        every = count_jobs(job_stream(config), pricer, threading.Event())
        assert every[0] > 0
        assert await ManifestSource(config).count(pricer) == every, path.name
