"""Commands built on the rest: throughput benchmark, channel statistics, shard packing, attention maps."""
