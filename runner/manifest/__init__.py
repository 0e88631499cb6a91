"""Rows to typed jobs: the manifest stage.

reader   streaming CSV/TSV/JSONL/Parquet rows with the line a user sees
arrowcsv CSV/TSV in Arrow blocks with the same rows and lines (the csv module where unsure)
vector   a block's cells typed as vectors: which rows need the per-row path
batches  the reader commands use: jobs in batches, counted or made (``iter_manifest_jobs``)
cells    cell syntax (``loras``, ``image_urls``, ``image_size``, ``seeds``)
jobs     a row to one or more typed ``Job``s: defaults, templates, seeds, job_key
idtable  duplicate-id checks in flat arrays
plan     the cost plan over a stream of jobs
"""
