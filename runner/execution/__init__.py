"""The run: admission, workers, completion, and the wiring that holds them.

engine      a run's wiring: ledger lock, HTTP client, strategy, uploads, downloads, one task group
hooks       the edges a test or a sharded run injects (transport, clocks, shared parts)
stages      the parts wired around admission: strategy, downloads, inputs, webhooks
scheduler   admission: resume decisions, budget, in-flight window, invalid rows, signals
worker      one job's life: intent, submit, completion, result, record, retries
results     a finished job's answer as an outcome: read, recovered from history, billed
completion  poll / stream / webhook strategies
outcome     pure reading of fal's answers: success, or a failure with type and retryability
flagged     --flagged keep|reroll|fail: outputs fal's safety checker flagged; re-roll seeds
reuse       --cache: jobs fulfilled from the cross-run output cache at $0
pacing      learned service times and the pure poll schedule
ratelimit   token bucket and AIMD submit rate
budget      the ``--max-cost`` meter: shares of one book, checked against the caps
spend       a run's budget pool and each shard run's handle on it; spendfile: across processes
sharedrate  a key's AIMD level shared by processes (a file in the gate directory)
interrupts  Ctrl-C counted once for every shard of a process: the two-step stop
progress    the tqdm bar or periodic log lines
cancel      ``runner cancel``: cancel what a run left in flight
"""
