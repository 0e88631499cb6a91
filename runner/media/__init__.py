"""Files in and out: local inputs, uploads to fal's storage, downloads of outputs.

inputs     local input checks and sizes
remote     remote input images' sizes from their first bytes (--probe-inputs)
uploads    inputs to URLs, with content-hash dedup
sink       output names, where files land, which OS errors mean the storage refuses writes
pending    completed jobs whose outputs are still to download
downloads  verify, hash and record outputs; resumable; file them in the cache
cache      the cross-run output cache: content-addressed entries, written whole by rename
"""
