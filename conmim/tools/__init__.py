"""Commands built on the rest: throughput benchmark, the small-scale study and its report, attention maps."""
