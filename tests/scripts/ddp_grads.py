"""torchrun worker for tests/test_distributed.py: one DDP step on this rank's half of a fixed batch.

Writes the student's gradients (identical on all ranks after DDP's all-reduce) from rank 0, and each
rank's BatchNorm running statistics (student and teacher projectors) to ``OUT.rankN``.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from conmim import ConMIM
from conmim.runtime.distributed import setup

out, sync_bn = sys.argv[1], sys.argv[2] == "1"
info = setup("cpu")
torch.manual_seed(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import TINY_MODEL_ARGS  # noqa: E402

model = ConMIM(**TINY_MODEL_ARGS, sync_bn=sync_bn)
g = torch.Generator().manual_seed(1)
weak, strong = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
from conmim.data.masking import MaskGenerator  # noqa: E402

masks = MaskGenerator((4, 4), "random_unit", 0.5, unit=2)
mask = torch.stack([masks(g) for _ in range(8)])
half = slice(4 * info.rank, 4 * info.rank + 4)
student = DistributedDataParallel(model.student, broadcast_buffers=False)
loss, _ = model.forward_with_stats(weak[half], strong[half], mask[half], student=student)
loss.backward()
if info.rank == 0:
    torch.save({n: p.grad for n, p in model.student.named_parameters()}, out)
torch.save({n: b for n, b in model.named_buffers() if ".running_" in n}, f"{out}.rank{info.rank}")
dist.barrier()
dist.destroy_process_group()
