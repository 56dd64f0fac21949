"""Official ConMIM checkpoints: state dicts built from the layout of spec §2 (BEiT names, index
buffers built from the spec's formula), converted, loaded strictly by timm, and checked against a
forward pass written from the spec's block description."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from conmim.cli import main
from conmim.export import load_encoder, load_pretrained
from conmim.knn import encode
from conmim.transfer import build_classifier

DIM, HEADS, DEPTH, PATCH, GRID = 64, 2, 2, 16, 14  # a narrow ViT at the official 224 / 16 geometry


def spec_index(g: int) -> torch.Tensor:
    """Spec §2.3: (h_p - h_q + g - 1) * (2g - 1) + (w_p - w_q + g - 1); [CLS] rows/columns use the 3 extras."""
    h, w = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    h, w, m = h.flatten(), w.flatten(), 2 * g - 1
    index = torch.empty(g * g + 1, g * g + 1, dtype=torch.long)
    index[1:, 1:] = (h[:, None] - h[None, :] + g - 1) * m + (w[:, None] - w[None, :] + g - 1)
    index[0, 1:], index[1:, 0], index[0, 0] = m * m, m * m + 1, m * m + 2
    return index


def official_state(fine_tuned: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    rows = (2 * GRID - 1) ** 2 + 3
    sd = {
        "cls_token": rand(1, 1, DIM),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rand(DIM),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": rand(DIM, base=1.0),
                p + "norm1.bias": rand(DIM),
                p + "attn.qkv.weight": rand(3 * DIM, DIM),
                p + "attn.q_bias": rand(DIM),
                p + "attn.v_bias": rand(DIM),
                p + "attn.proj.weight": rand(DIM, DIM),
                p + "attn.proj.bias": rand(DIM),
                p + "norm2.weight": rand(DIM, base=1.0),
                p + "norm2.bias": rand(DIM),
                p + "mlp.fc1.weight": rand(4 * DIM, DIM),
                p + "mlp.fc1.bias": rand(4 * DIM),
                p + "mlp.fc2.weight": rand(DIM, 4 * DIM),
                p + "mlp.fc2.bias": rand(DIM),
                p + "gamma_1": rand(DIM, base=0.5),
                p + "gamma_2": rand(DIM, base=0.5),
            }
        )
        if fine_tuned:
            sd[p + "attn.relative_position_bias_table"] = rand(rows, HEADS, scale=0.5)
            sd[p + "attn.relative_position_index"] = spec_index(GRID)
    if fine_tuned:
        sd.update(
            {
                "fc_norm.weight": rand(DIM, base=1.0),
                "fc_norm.bias": rand(DIM),
                "head.weight": rand(1000, DIM),
                "head.bias": rand(1000),
            }
        )
    else:
        sd.update(
            {
                "mask_token": rand(1, 1, DIM),
                "norm.weight": rand(DIM, base=1.0),
                "norm.bias": rand(DIM),
                "rel_pos_bias.relative_position_bias_table": rand(rows, HEADS, scale=0.5),
                "rel_pos_bias.relative_position_index": spec_index(GRID),
                "lm_head.weight": rand(8192, DIM),
                "lm_head.bias": rand(8192),
                "projectors.0.weight": rand(128, DIM),
                "projectors.1.weight": rand(128),
                "projectors.1.running_mean": rand(128),
            }
        )
    return sd


def spec_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Spec §2.2-2.4 written out: pre-norm blocks, qkv bias (q, 0, v), relative bias, layer scale;
    tokens after the final norm (pre-training) or logits of mean-pool + fc_norm + head (fine-tuned)."""
    b, hd = x.shape[0], DIM // HEADS
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1)
    n = t.shape[1]

    def rel_bias(prefix: str) -> torch.Tensor:
        table, index = sd[prefix + "relative_position_bias_table"], sd[prefix + "relative_position_index"]
        return table[index.reshape(-1)].reshape(n, n, HEADS).permute(2, 0, 1)

    def ln(v, name):
        return F.layer_norm(v, (DIM,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    for i in range(DEPTH):
        p = f"blocks.{i}."
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(DIM), sd[p + "attn.v_bias"]])
        q, k, v = (
            F.linear(ln(t, p + "norm1"), sd[p + "attn.qkv.weight"], bias)
            .reshape(b, n, 3, HEADS, hd)
            .permute(2, 0, 3, 1, 4)
        )
        logits = (q * hd**-0.5) @ k.transpose(-2, -1)
        logits = logits + rel_bias("rel_pos_bias." if "rel_pos_bias.relative_position_index" in sd else p + "attn.")
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, DIM)
        t = t + sd[p + "gamma_1"] * F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(ln(t, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        t = t + sd[p + "gamma_2"] * F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    if "norm.weight" in sd:
        return ln(t, "norm")
    return F.linear(ln(t[:, 1:].mean(1), "fc_norm"), sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("fine_tuned", [False, True])
def test_official_checkpoint_converts_and_matches_spec_forward(tmp_path, fine_tuned):
    sd = official_state(fine_tuned)
    pth = tmp_path / "official.pth"
    # released files hold the weights under "model", next to the run's argparse arguments
    torch.save({"model": sd, "args": argparse.Namespace(lr=4e-3, model="beit_base_patch16_224"), "epoch": 99}, pth)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(pth), "--out", str(out)]) == 0
    model = load_encoder(out).eval()  # timm Beit, strict load
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = model(x) if fine_tuned else model.forward_features(x)
        assert torch.allclose(got, spec_forward(sd, x), atol=2e-4), (got - spec_forward(sd, x)).abs().max()
        features = encode(model, x, "mean")
    if fine_tuned:  # k-NN / probe features of a fine-tuned model: its pooled fc_norm output
        assert torch.allclose(features, model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-5)
    weights, spec = load_pretrained(out)
    classifier, _ = build_classifier(weights, spec, 10, img_size=384 if not fine_tuned else 0)
    with torch.no_grad():
        assert classifier(
            torch.randn(1, 3, classifier.patch_embed.img_size[0], classifier.patch_embed.img_size[1])
        ).shape == (1, 10)


def test_convert_rejects_a_file_without_a_vit(tmp_path, capsys):
    pth = tmp_path / "other.pth"
    torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, pth)
    assert main(["convert", str(pth), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "patch_embed.proj.weight" in capsys.readouterr().err
