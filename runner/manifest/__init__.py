"""Rows to typed jobs: the manifest stage.

reader   streaming CSV/TSV/JSONL/Parquet rows with the line a user sees
cells    cell syntax (``loras``, ``image_urls``, ``image_size``, ``seeds``)
jobs     a row to one or more typed ``Job``s: defaults, templates, seeds, job_key
idtable  duplicate-id checks in flat arrays
plan     the cost plan over a stream of jobs
"""
