"""Past one account and one machine: shards, account gates shared by shards, several keys.

    runner.scale.keys      --keys-file: keys with their own limits; which shard uses which
    runner.scale.layout    a sharded run directory: run.json fixes N; shards/K/ per shard
    runner.scale.shards    run some or all shards in this process, one gate per key
    runner.scale.spending  a sharded run's budget pool, seeded with the shards' ledger spend
    runner.scale.shardlog  each shard's messages on the run's live stream, prefixed
    runner.scale.ray_driver  (optional extra ``runner[ray]``) shards as Ray tasks
    runner.scale.ray_gate    its actors: a key's gate, a run's budget, the progress board

Nothing imports :mod:`runner.scale.ray_driver` or ``ray_gate`` eagerly: ``ray`` is needed only
by them.
"""
