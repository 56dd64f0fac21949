"""The pixel-MIM baseline learns, and every study ablation switch changes what it says it changes."""

from __future__ import annotations

import pytest
import torch
from fixtures import fit_one_batch

from conmim.config import load_config
from conmim.export.encoders import encoder_state
from conmim.models.conmim import ConMIM, denoising_contrastive_loss
from conmim.models.pixel_mim import PixelMIM, normalized_patches, patchify
from conmim.runtime.checkpoint import load_latest
from conmim.runtime.distributed import DistInfo
from conmim.train.engine import pretrain
from conmim.train.setup import build_loader

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = [
    "model.arch=vit_tiny",
    "model.depth=2",
    "model.img_size=32",
    "model.patch_size=4",
    "model.proj_hidden_dim=64",
    "model.proj_out_dim=32",
    "data.num_workers=0",
    "data.crop_scale_min=0.25",
    "train.batch_size=8",
    "precision=fp32",
]


def _loader_batch(overrides: list[str], count: int = 16):
    cfg = load_config(None, SMALL + overrides, default_preset="fashion_mnist")
    _loader, _sampler, dataset = build_loader(cfg, DistInfo(), 0)
    items = [dataset[(0, i)] for i in range(count)]
    return [torch.stack(x) for x in zip(*items, strict=True)]


def test_patchify_matches_slicing():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)  # 2 x 3 grid
    row, col = 1, 2
    expected = images[1, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, row * 3 + col], expected)
    target = normalized_patches(images, 4)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 6), atol=1e-5)


def test_pixel_baseline_loss_decreases_on_a_batch():
    torch.manual_seed(0)
    weak, strong, mask = _loader_batch(["model.objective=pixel"])
    model = PixelMIM(arch="vit_tiny", img_size=32, patch_size=4, depth=2)
    assert model.teacher.encoder is model.student.encoder
    losses, accuracy = fit_one_batch(model, weak, strong, mask)
    assert losses[-1] < 0.7 * losses[0], losses
    assert 0.0 <= accuracy <= 1.0


def test_engine_pixel_objective_and_momentum_zero(tmp_path):
    """Through the real engine: pixel checkpoints carry teacher.encoder; m=0 makes the teacher a copy."""
    common = SMALL + [
        "data.source=synthetic",
        "data.synthetic_size=16",
        "train.max_steps=2",
        "train.epochs=1",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "model.teacher_drop_path=0.0",
    ]
    pix = load_config(
        None, common + ["model.objective=pixel", f"output_dir={tmp_path / 'pix'}"], default_preset="fashion_mnist"
    )
    pretrain(pix)
    state, _ = load_latest(tmp_path / "pix" / "checkpoints")
    teacher, student = encoder_state(state, "teacher"), encoder_state(state, "student")
    assert teacher.keys() == student.keys() and all(torch.equal(teacher[k], student[k]) for k in teacher)
    assert not any(k.startswith("teacher.projector") for k in state["model"])

    no_ema = load_config(
        None,
        common + ["train.momentum=0.0", "train.momentum_end=0.0", f"output_dir={tmp_path / 'noema'}"],
        default_preset="fashion_mnist",
    )
    model = pretrain(no_ema)["model"]
    for (name, t), (_n, s) in zip(model.teacher.named_parameters(), model.student.named_parameters(), strict=True):
        assert torch.equal(t, s), name
    default = load_config(None, common + [f"output_dir={tmp_path / 'ema'}"], default_preset="fashion_mnist")
    model = pretrain(default)["model"]
    differs = [
        not torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.student.parameters(), strict=True)
    ]
    assert any(differs)  # with the default momentum the teacher lags the student


def test_symmetric_perturbation_switches():
    base_weak, base_strong, _ = _loader_batch([])
    weak_both_w, weak_both_s, _ = _loader_batch(["data.strong_aug=false"])
    strong_both_w, strong_both_s, _ = _loader_batch(["data.weak_aug_strong=true"])
    # default: the weak view is the plain crop, the strong view is photometrically perturbed
    assert torch.equal(base_weak, weak_both_w)
    assert sum(not torch.equal(a, b) for a, b in zip(base_weak, base_strong, strict=True)) >= 8
    # weak on both: the teacher sees exactly the student's pixels
    assert torch.equal(weak_both_w, weak_both_s)
    # strong on both: the teacher's view is unchanged, the student's view is perturbed as well
    assert torch.equal(strong_both_s, base_strong)
    assert sum(not torch.equal(a, b) for a, b in zip(strong_both_w, base_weak, strict=True)) >= 8


def _unit_aligned(mask: torch.Tensor, grid: int = 8, unit: int = 2) -> bool:
    m = mask.view(grid // unit, unit, grid // unit, unit)
    return bool((m == m[:, :1, :, :1]).all())


def test_mask_type_switch():
    _, _, unit_masks = _loader_batch([])
    _, _, block_masks = _loader_batch(["mask.type=block", "mask.min_block_patches=8"])
    assert all(_unit_aligned(m) and int(m.sum()) == 48 for m in unit_masks)
    assert not all(_unit_aligned(m) for m in block_masks)
    assert all(0 < int(m.sum()) <= 48 for m in block_masks)
    assert not torch.equal(unit_masks, block_masks)


def test_temperature_switch():
    cfg = load_config(None, SMALL + ["model.temperature=0.2"], default_preset="fashion_mnist")
    model = ConMIM.from_config(cfg.model)
    torch.manual_seed(0)
    weak, strong = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    mask = torch.rand(4, 64) < 0.75
    with torch.no_grad():
        loss, _ = model.forward_with_stats(weak, strong, mask)
        s, t = model.student(weak, mask), model.teacher(strong)
        at_02 = denoising_contrastive_loss(s, t, mask, 0.2)[0]
        at_01 = denoising_contrastive_loss(s, t, mask, 0.1)[0]
    assert torch.allclose(loss, at_02) and not torch.allclose(loss, at_01)
