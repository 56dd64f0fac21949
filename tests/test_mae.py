"""The MAE-style baseline: its encoder never sees a masked patch, it learns, the configuration refuses
what it cannot run, and a run through the real engine exports a plain timm ViT."""

from __future__ import annotations

import pytest
import timm
import torch
from fixtures import fit_one_batch

from conmim.config import ConfigError, load_config
from conmim.export.encoders import encoder_state, spec_of
from conmim.models.mae import MAE, sincos_with_cls, visible_first
from conmim.runtime.checkpoint import load_latest
from conmim.runtime.distributed import DistInfo
from conmim.train.engine import pretrain
from conmim.train.setup import build_loader

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "model.objective=mae",
    "model.encoder=vit",
    "model.pos_embed=none",  # the fashion_mnist preset's BEiT position options
    "model.rel_pos_init=zero",
    "model.arch=vit_tiny",
    "model.depth=2",
    "model.img_size=32",
    "model.patch_size=4",
    "data.num_workers=0",
    "train.batch_size=8",
    "precision=fp32",
]


def _model() -> MAE:
    return MAE(arch="vit_tiny", img_size=32, patch_size=4, depth=2, in_chans=1, decoder_dim=64, decoder_heads=2)


def _mask(batch: int, patches: int, masked: int, seed: int = 0) -> torch.Tensor:
    """``masked`` random patches of each image, a different set per image."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.rand(batch, patches, generator=g).argsort(1).argsort(1)
    return ranks < masked


def test_visible_first_orders_visible_patches_first_in_image_order():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    order, visible = visible_first(mask)
    assert visible == 2
    assert order.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="same number of masked patches"):
        visible_first(torch.tensor([[True, False], [True, True]]))


def test_encoder_sees_only_the_visible_patches():
    torch.manual_seed(0)
    model = _model().eval()
    images = torch.randn(3, 1, 32, 32)
    mask = _mask(3, 64, 48)
    tokens, order = model.student.encode(images, mask)
    assert tokens.shape == (3, 1 + 16, model.student.encoder.embed_dim)
    pixel_mask = mask.reshape(3, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    masked_changed = torch.where(pixel_mask, torch.randn_like(images), images)
    assert torch.equal(model.student.encode(masked_changed, mask)[0], tokens)  # masked pixels: no effect
    visible_changed = torch.where(pixel_mask, images, torch.randn_like(images))
    assert not torch.allclose(model.student.encode(visible_changed, mask)[0], tokens)
    assert model.student.decode(tokens, order).shape == (3, 64, 16)  # a prediction for every patch


def test_position_embedding_is_fixed_sincos_and_loss_decreases():
    """On real Fashion-MNIST views and masks from the loader (noise has no predictable pixels)."""
    torch.manual_seed(0)
    cfg = load_config(None, SMALL, default_preset="fashion_mnist")
    dataset = build_loader(cfg, DistInfo(), 0)[2]
    images, _strong, mask = (torch.stack(x) for x in zip(*(dataset[(0, i)] for i in range(16)), strict=True))
    model = MAE.from_config(cfg.model)
    pos = model.student.encoder.pos_embed
    assert not pos.requires_grad and torch.equal(pos, sincos_with_cls((8, 8), pos.shape[-1]))
    losses, accuracy = fit_one_batch(model, images, images, mask)
    assert losses[-1] < 0.7 * losses[0], losses
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.encoder=beit"], "model.encoder"),
        (["mask.type=block"], "mask.type"),
        (["mask.type=random", "mask.ratio=1.0"], "mask.ratio"),
        (["model.decoder_dim=130"], "model.decoder_depth/decoder_dim/decoder_heads"),
    ],
)
def test_configuration_refuses_what_mae_cannot_run(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("/", ".")):
        load_config(None, SMALL + overrides, default_preset="fashion_mnist")


def test_engine_run_exports_a_timm_vit(tmp_path):
    cfg = load_config(
        None,
        SMALL
        + [
            "data.source=synthetic",
            "data.synthetic_size=16",
            "train.max_steps=3",
            "train.epochs=1",
            "train.log_every=1",
            "train.checkpoint_every=3",
            f"output_dir={tmp_path}",
        ],
        default_preset="fashion_mnist",
    )
    trained = pretrain(cfg)["model"].student.state_dict()
    state, _ = load_latest(tmp_path / "checkpoints")
    teacher, student = encoder_state(state, "teacher"), encoder_state(state, "student")
    assert teacher.keys() == student.keys() and all(torch.equal(teacher[k], student[k]) for k in teacher)
    saved = {k.removeprefix("student."): v for k, v in state["model"].items() if k.startswith("student.")}
    assert "decoder_pred.weight" in saved and saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    spec = spec_of(cfg)
    vit = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    vit.load_state_dict(teacher)  # strict: exactly timm's names and shapes
    assert torch.equal(vit.pos_embed, sincos_with_cls((8, 8), vit.embed_dim))  # stayed fixed in training
