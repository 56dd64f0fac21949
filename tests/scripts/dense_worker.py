"""torchrun worker for tests/test_dense.py: ``conmim ARGS...`` (segment or detect) as the command line
runs it, with each rank's training batches, as ``(index, augmentation seed)`` pairs, written to
``RECORD.rankN`` (json) so the test can check how the ranks split the data."""

import json
import os
import sys

from conmim.cli import main
from conmim.dense.data import StepSampler

record, args = sys.argv[1], sys.argv[2:]
seen: list = []
real_iter = StepSampler.__iter__


def recording_iter(self):
    for batch in real_iter(self):
        seen.append(batch)
        yield batch


StepSampler.__iter__ = recording_iter
code = main(args)
with open(f"{record}.rank{os.environ['RANK']}", "w") as f:
    json.dump(seen, f)
sys.exit(code)
