"""Gradient accumulation (``train.accum_steps``): what it keeps and what it changes for ConMIM.

ConMIM's negatives are the other patches of the same image, so a micro-batch loses no negatives:
with the projector's BatchNorm out of the picture, two micro-batches of B/2 give the gradient of one
batch of B. The BatchNorm (batch statistics over every token of the micro-batch) is what differs.
The training loop splits the same images, views and masks into micro-batches, and the optimizer
step, every schedule and the teacher's EMA count optimizer steps, not micro-batches.
"""

from __future__ import annotations

import json

import pytest
import torch

from conmim.config import load_config
from conmim.models.conmim import ConMIM
from conmim.train import engine
from conmim.train.engine import pretrain
from conmim.train.step import forward_backward

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(batch: int = 8, tokens: int = 16, masked: int = 12):
    """Views and a mask with the same number of masked patches in every image, as ``random_unit`` draws."""
    g = torch.Generator().manual_seed(0)
    weak, strong = torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 3, 16, 16, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(tokens, generator=g)[:masked]] = True
    return weak, strong, mask


def _gradients(model: ConMIM, weak, strong, mask, accum: int) -> tuple[dict[str, torch.Tensor], float]:
    """The student's accumulated gradient and mean loss over ``accum`` micro-batches of the batch."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.student.zero_grad(set_to_none=True)
    losses = [
        forward_backward(model, model.student, w, s, m, None, scaler, accum)[0]
        for w, s, m in zip(weak.chunk(accum), strong.chunk(accum), mask.chunk(accum), strict=True)
    ]
    grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
    return grads, float(torch.stack(losses).mean())


@pytest.mark.parametrize("batchnorm", ["running_stats", "batch_stats"])
def test_two_micro_batches_give_the_full_batch_gradient_except_through_batchnorm(batchnorm):
    torch.manual_seed(0)
    model = ConMIM("vit_tiny", 16, 4, depth=2, proj_hidden_dim=64, proj_out_dim=32)
    model.train()
    if batchnorm == "running_stats":  # every token normalised the same way whatever the micro-batch
        model.student.projector.eval()
        model.teacher.projector.eval()
    inputs = _inputs()
    full, full_loss = _gradients(model, *inputs, accum=1)
    split, split_loss = _gradients(model, *inputs, accum=2)
    assert full.keys() == split.keys() and len(full) > 10
    worst = max(float((full[n] - split[n]).norm() / full[n].norm().clamp_min(1e-12)) for n in full)
    print(f"BatchNorm {batchnorm}: largest relative gradient difference, 2 x 4 against 1 x 8 images: {worst:.3g}")
    if batchnorm == "running_stats":
        # intra-image negatives: the per-image loss, its batch mean and the gradient are unchanged
        assert split_loss == pytest.approx(full_loss, rel=1e-6)
        assert worst < 1e-4, worst
    else:
        # the projector normalises each micro-batch by its own statistics: a different objective
        assert split_loss != pytest.approx(full_loss, rel=1e-4)
        assert worst > 1e-2, worst


def test_the_loop_splits_the_same_batch_and_counts_optimizer_steps(tmp_path, tiny_overrides, monkeypatch):
    """batch 4 x accum 2 against batch 8 x accum 1: the same images, views and masks in the same
    order; one optimizer step, one EMA update and one schedule value per 8 images."""
    calls: dict[str, list] = {}

    def recording_forward_backward(model, student, weak, strong, mask, *args):
        calls["batches"].append((weak.clone(), strong.clone(), mask.clone()))
        return forward_backward(model, student, weak, strong, mask, *args)

    original_update = ConMIM.update_teacher

    def counting_update(self, *args, **kwargs):
        calls["ema"].append(args[0])  # the momentum of this update
        return original_update(self, *args, **kwargs)

    monkeypatch.setattr(engine, "forward_backward", recording_forward_backward)
    monkeypatch.setattr(ConMIM, "update_teacher", counting_update)
    runs = {}
    for batch, accum in ((8, 1), (4, 2)):
        calls.update(batches=[], ema=[])
        out = tmp_path / f"b{batch}x{accum}"
        overrides = ["data.source=synthetic", "data.synthetic_size=64", "train.max_steps=4", "train.log_every=1"]
        cfg = load_config(
            None,
            tiny_overrides
            + overrides
            + [f"train.batch_size={batch}", f"train.accum_steps={accum}", f"output_dir={out}"],
        )
        summary = pretrain(cfg)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[accum] = {"batches": calls["batches"], "ema": calls["ema"], "records": records, "steps": summary["steps"]}

    one, two = runs[1], runs[2]
    assert one["steps"] == two["steps"] == 4
    assert len(one["batches"]) == 4 and len(two["batches"]) == 8  # micro-batches
    assert len(one["ema"]) == len(two["ema"]) == 4 and one["ema"] == two["ema"]  # teacher: once per step
    for k, whole in enumerate(one["batches"]):
        halves = two["batches"][2 * k : 2 * k + 2]
        for part, name in enumerate(("weak", "strong", "mask")):
            assert torch.equal(whole[part], torch.cat([h[part] for h in halves])), (k, name)

    def schedule(records):
        keys = ("step", "epoch", "lr", "weight_decay", "momentum")
        return [{k: r[k] for k in keys} for r in records if "loss" in r]

    assert schedule(one["records"]) == schedule(two["records"])
    assert [r["step"] for r in two["records"]] == [1, 2, 3, 4]
