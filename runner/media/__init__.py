"""Files in and out: local inputs, uploads to fal's storage, downloads of outputs.

inputs     local input checks and sizes
uploads    inputs to URLs, with content-hash dedup
downloads  verify, hash and record outputs; resumable
"""
