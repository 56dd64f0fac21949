"""Real two-process torchrun/gloo runs on CPU compared with one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY_MODEL_ARGS

from conmim import ConMIM
from conmim.data.masking import MaskGenerator

WORKER = Path(__file__).parent / "scripts" / "ddp_grads.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

pytestmark = pytest.mark.slow  # multi-process: pytest -m "not slow" leaves these out


def run_torchrun(args: list[str], timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(TORCHRUN + args, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of tests/scripts/ddp_grads.py: 8 images (4 per rank) and their masks."""
    g = torch.Generator().manual_seed(1)
    weak, strong = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    masks = MaskGenerator((4, 4), "random_unit", 0.5, unit=2)
    return weak, strong, torch.stack([masks(g) for _ in range(8)])


def fresh_model() -> ConMIM:
    torch.manual_seed(0)
    return ConMIM(**TINY_MODEL_ARGS)


def running_stats(images: slice) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics after one training forward over ``images`` of the fixed batch."""
    model = fresh_model()
    weak, strong, mask = fixed_batch()
    model(weak[images], strong[images], mask[images])
    return {n: b for n, b in model.named_buffers() if ".running_" in n}


def single_process_grads(sync_bn: bool) -> dict[str, torch.Tensor]:
    """What DDP must reproduce, computed in this process from the same weights and batch."""
    model = fresh_model()
    weak, strong, mask = fixed_batch()
    if sync_bn:  # BatchNorm over all 2b images: one forward over the whole batch
        model(weak, strong, mask).backward()
    else:  # per-process BatchNorm: each half on its own, gradients averaged as DDP does
        for half in (slice(0, 4), slice(4, 8)):
            (model(weak[half], strong[half], mask[half]) / 2).backward()
    return {n: p.grad for n, p in model.student.named_parameters()}


@pytest.mark.parametrize("sync_bn", [False, True], ids=["per-process-bn", "global-bn"])
def test_ddp_gradients_match_single_process(tmp_path, sync_bn):
    out = tmp_path / "grads.pt"
    run_torchrun([str(WORKER), str(out), "1" if sync_bn else "0"])
    ddp = torch.load(out, weights_only=True)
    ref = single_process_grads(sync_bn)
    assert ddp.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max().item()
        assert (ddp[name] - ref[name]).abs().max().item() <= 1e-5 * scale + 1e-6, name
    # running statistics: global BatchNorm tracks the whole batch on every rank, per-process its own half
    for rank, images in enumerate((slice(0, 4), slice(4, 8))):
        got = torch.load(f"{out}.rank{rank}", weights_only=True)
        want = running_stats(slice(0, 8) if sync_bn else images)
        assert got.keys() == want.keys() and len(got) == 12  # mean, var of 3 projector BatchNorms x 2 branches
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), (rank, name)


def test_torchrun_pretrain_writes_one_run(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    run_torchrun(
        [
            "-m",
            "conmim.cli",
            "pretrain",
            *tiny_overrides,
            "data.source=synthetic",
            "data.synthetic_size=64",
            "train.max_steps=3",
            f"output_dir={out}",
        ]
    )
    lines = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert [eval_step(ln) for ln in lines] == [2, 3]  # rank 0 alone writes, once per log step
    assert (out / "checkpoints" / "last.pt").is_file()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3


def eval_step(line: str) -> int:
    import json

    return json.loads(line)["step"]


def test_torchrun_finetune_splits_the_images_and_writes_once(tmp_path, tiny_overrides):
    """Two ranks fine-tune from a real pre-training checkpoint: each takes half of every epoch (64 images,
    batch 8 per rank: 4 steps), rank 0 alone writes records, checkpoints, results and the export."""
    from conmim.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", *tiny_overrides, "train.max_steps=2"]) == 0
    run_torchrun(
        [
            "-m",
            "conmim.cli",
            "finetune",
            str(run),
            "data.train_limit=64",
            "data.test_limit=32",
            "finetune.epochs=2",
            "finetune.batch_size=8",
            "data.num_workers=0",
        ]
    )
    out = run / "finetune"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records if "test_top1" in r] == [(1, 4), (2, 8)]
    result = json.loads((out / "results.json").read_text())
    assert result["train_images"] == 64 and len(result["history"]) == 2
    assert (out / "best.safetensors").is_file() and (out / "checkpoints" / "last.pt").is_file()
