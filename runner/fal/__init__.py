"""fal's wire, and nothing else: the queue protocol, storage, webhooks.

    protocol   typed wire models of fal's queue, parsed at the boundary
    sse        the status stream: an incremental server-sent-events parser
    paths      a request's URLs from its endpoint and request ids
    transport  httpcore's pool behind httpx's transport interface; per-call timeouts
    client     ``QueueClient``: one HTTP call per method
    retry      the one retry policy: pure classifier, pure backoff, one loop
    storage    fal's storage protocol (CDN token, simple, multipart, initiate)
    history    the Platform API: request history (payloads) and the account's prices
    key        the API key's shape check and the one redaction function
    jwks       the JWKS cache
    webhook    Ed25519 verification and the receiver app
    receiver   the receiver on a socket

It imports nothing of the runner but :mod:`runner.errors`, so it could be lifted out whole.
"""
