"""Time the index scan of ``data.source=webdataset``: every process reads every shard's tar headers once.

Writes ``--samples`` samples (a 100-byte stand-in image and a label each, so the scan's cost, which
grows with the member count and not with image size, is all there is) into shards of
``--shard-size`` in a temporary folder, then builds :class:`conmim.data.shards.ShardSource` over them
twice (cold-ish right after writing, then warm) and prints the seconds and microseconds per sample.

    PYTHONPATH=$PWD python benchmarks/shard_index.py --samples 50000 --shard-size 5000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import webdataset as wds

from conmim.data.shards import ShardSource, shard_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--shard-size", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="conmim-shard-index-") as tmp:
        pattern = str(Path(tmp) / "shard-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=args.shard_size, verbose=0, mtime=0) as writer:
            for i in range(args.samples):
                writer.write({"__key__": f"{i:08d}", "jpg": bytes(100), "cls": str(i % 1000).encode()})
        for run in ("first", "second"):
            start = time.perf_counter()
            source = ShardSource(shard_paths(tmp))
            seconds = time.perf_counter() - start
            assert len(source) == args.samples
            shards = len(source.paths)
            per = seconds / args.samples * 1e6
            print(
                json.dumps(
                    {
                        "scan": run,
                        "samples": args.samples,
                        "shards": shards,
                        "s": round(seconds, 3),
                        "us_per_sample": round(per, 1),
                    }
                )
            )


if __name__ == "__main__":
    main()
