"""Position parameters of the BEiT encoder: init, optimizer, export to timm, resize on fine-tuning."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import build_sincos2d_pos_embed

from conmim.config import load_config
from conmim.eval.transfer import build_classifier
from conmim.export.encoders import spec_of, write_encoder
from conmim.models.conmim import ConMIM, locality_slopes
from conmim.train.optim import param_groups

SMALL = dict(arch="vit_tiny", img_size=32, patch_size=4, depth=2, proj_hidden_dim=64, proj_out_dim=32)


def test_sincos_embedding_is_mae_pattern_with_zero_cls_and_copied_to_teacher():
    model = ConMIM(**SMALL, pos_embed="sincos")
    pos = model.student.encoder.pos_embed
    assert pos.shape == (1, 65, 192) and pos.requires_grad
    torch.testing.assert_close(pos[0, 1:], build_sincos2d_pos_embed([8, 8], 192))
    assert pos[0, 0].abs().max() == 0
    assert torch.equal(model.teacher.encoder.pos_embed, pos)


def test_fixed_sincos_embedding_stays_out_of_the_optimizer_and_unchanged_by_ema():
    model = ConMIM(**SMALL, pos_embed="sincos_fixed")
    pos = model.student.encoder.pos_embed
    assert not pos.requires_grad
    grouped = {id(p) for g in param_groups(model.student, 0.05) for p in g["params"]}
    assert id(pos) not in grouped
    before = model.teacher.encoder.pos_embed.clone()
    model.update_teacher(0.0)  # momentum 0 copies the student: the frozen table is the same
    assert torch.equal(model.teacher.encoder.pos_embed, before)


def test_locality_prior_penalises_distance_per_head_and_leaves_cls_free():
    model = ConMIM(**SMALL, rel_pos_init="locality")
    encoder = model.student.encoder
    bias = encoder.rel_pos_bias()  # (heads, 1 + N, 1 + N) as every block adds it to its logits
    slopes = locality_slopes(3)
    assert slopes.tolist() == [1.0, 0.25, 0.0625]
    coords = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(64, 2).float()
    distance = torch.cdist(coords, coords)
    torch.testing.assert_close(bias[:, 1:, 1:], -slopes[:, None, None] * distance[None])
    assert bias[:, 0, :].abs().max() == 0 and bias[:, :, 0].abs().max() == 0  # [CLS] rows and column


def test_the_official_layout_is_untouched_by_default():
    encoder = ConMIM(**SMALL).student.encoder
    assert encoder.pos_embed is None
    assert encoder.rel_pos_bias.relative_position_bias_table.abs().max() == 0


@pytest.mark.parametrize("pos_embed, rel_pos_init", [("sincos", "zero"), ("none", "locality")])
def test_exports_load_strictly_in_timm_and_fine_tune_at_another_resolution(tmp_path, pos_embed, rel_pos_init):
    cfg = load_config(
        None,
        [
            "model.arch=vit_tiny",
            "model.depth=2",
            "model.img_size=32",
            "model.patch_size=4",
            f"model.pos_embed={pos_embed}",
            f"model.rel_pos_init={rel_pos_init}",
        ],
    )
    model = ConMIM.from_config(cfg.model)
    spec = spec_of(cfg)
    weights = {k: v for k, v in model.teacher.encoder.state_dict().items()}
    path, spec_path = write_encoder(weights, spec, tmp_path / "enc.safetensors")
    loaded_spec = json.loads(spec_path.read_text())
    timm_model = timm.create_model(loaded_spec["model_name"], pretrained=False, **loaded_spec["kwargs"])
    timm_model.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_model.eval().forward_features(x), model.teacher.encoder.eval().forward_features(x))
    classifier, _ = build_classifier(weights, spec, num_classes=10, img_size=48)  # 8x8 -> 12x12 grid
    assert classifier(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    if pos_embed != "none":
        assert classifier.pos_embed.shape == (1, 145, 192)
    else:  # the shared locality table, resized into each block's own table
        table = classifier.blocks[0].attn.relative_position_bias_table
        assert table.shape == (23 * 23 + 3, 3)
        centre = 11 * 23 + 11  # distance 0 on the 12x12 grid
        assert table[centre].abs().max() < 1e-4 and table[:-3].max() < 1e-4 and table[:-3].min() < -9


def test_position_options_are_beit_only():
    from conmim.config import ConfigError

    with pytest.raises(ConfigError, match="model.pos_embed/rel_pos_init"):
        load_config(None, ["model.encoder=vit", "model.rel_pos_init=locality"])
    with pytest.raises(ConfigError, match="model.pos_embed='learned' is not allowed: one of none, mask_sincos, sincos"):
        load_config(None, ["model.pos_embed=learned"])


def test_mask_sincos_marks_masked_tokens_by_position_and_leaves_the_encoder_official():
    model = ConMIM(**SMALL, pos_embed="mask_sincos")
    student = model.student
    assert student.encoder.pos_embed is None  # exports keep the official layout
    assert "mask_pos" not in student.state_dict()  # fixed pattern, rebuilt on construction
    torch.testing.assert_close(student.mask_pos[0], build_sincos2d_pos_embed([8, 8], 192))
    images, mask = torch.zeros(1, 3, 32, 32), torch.ones(1, 64, dtype=torch.bool)
    tokens = student.eval().features(images, mask)[0, 1:]  # every patch masked, identical pixels
    assert torch.cdist(tokens, tokens).fill_diagonal_(1.0).min() > 1e-3  # ... yet all 64 outputs differ
    plain = ConMIM(**SMALL).student.eval().features(images, mask)[0, 1:]
    # the official start: all masked outputs identical (cdist's default matrix-product path leaves
    # rounding errors near 1e-2 between identical rows, hence the exact mode)
    assert torch.cdist(plain, plain, compute_mode="donot_use_mm_for_euclid_dist").max() < 1e-4


def test_tiny_pretraining_with_the_default_position_signal_learns_its_task_where_the_official_start_does_not(
    tmp_path, fashion_mnist_dir, one_thread
):
    """60 steps on real Fashion-MNIST, the built-in preset's position choices against the official start."""
    from conmim.train.engine import pretrain

    preset = load_config("fashion_mnist")  # the built-in default preset
    assert (preset.model.pos_embed, preset.model.rel_pos_init) == ("mask_sincos", "locality")
    accuracy = {}
    for pos_embed, rel_pos_init in (("mask_sincos", "locality"), ("none", "zero")):
        cfg = load_config(
            "fashion_mnist",
            [
                f"model.pos_embed={pos_embed}",
                f"model.rel_pos_init={rel_pos_init}",
                "model.depth=2",
                "model.proj_hidden_dim=256",
                "train.batch_size=32",
                "train.max_steps=60",
                "train.log_every=10",
                "train.base_lr=4e-3",
                "train.warmup_epochs=0.005",
                "precision=fp32",
                "data.num_workers=0",
                "eval.final_knn=false",
                "eval.monitor_every=0",
                f"data.path={fashion_mnist_dir}",
                f"output_dir={tmp_path / pos_embed}",
            ],
        )
        pretrain(cfg)
        records = [json.loads(line) for line in (tmp_path / pos_embed / "metrics.jsonl").read_text().splitlines()]
        accuracy[pos_embed] = sum(r["retrieval_acc"] for r in records[-2:]) / 2  # steps 41-60
    chance = 1 / 64
    assert accuracy["mask_sincos"] > 2 * chance, accuracy
    assert accuracy["none"] < 1.5 * chance, accuracy
