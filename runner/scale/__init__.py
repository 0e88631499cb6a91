"""Past one account and one machine: shards, account gates shared by shards, several keys.

    runner.scale.keys      --keys-file: keys with their own limits; which shard uses which
    runner.scale.layout    a sharded run directory: run.json fixes N; shards/K/ per shard
    runner.scale.shards    run some or all shards in this process, one gate per key
    runner.scale.ray_driver  (optional extra ``runner[ray]``) shards as Ray tasks

Nothing imports :mod:`runner.scale.ray_driver` eagerly: ``ray`` is needed only by it.
"""
