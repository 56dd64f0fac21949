"""conmim visualize: the recomputed attention equals timm's own, and the command writes right-sized PNGs."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from conmim.cli import main
from conmim.config import load_config
from conmim.engine import pretrain
from conmim.model import ConMIM
from conmim.visualize import last_block_attention

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("encoder", ["beit", "vit"])
def test_attention_matches_timm_explicit_path(encoder):
    torch.manual_seed(0)
    model = ConMIM(
        arch="vit_tiny", img_size=32, patch_size=4, depth=2, encoder=encoder, proj_hidden_dim=32, proj_out_dim=16
    )
    enc = model.teacher.encoder.eval()
    with torch.no_grad():  # give the shared relative position bias non-zero values so it matters
        for name, p in enc.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
    images = torch.randn(2, 3, 32, 32)
    attn = enc.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path: softmax output goes through attn_drop
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.setdefault("probs", args[0]))
    with torch.no_grad():
        enc.forward_features(images)
    handle.remove()
    ours = last_block_attention(enc, images)
    assert ours.shape == (2, 3, 65, 65)
    assert torch.allclose(ours, seen["probs"], atol=1e-5)
    assert torch.allclose(ours.sum(-1), torch.ones(2, 3, 65))


def test_visualize_writes_pngs_from_a_real_checkpoint(tmp_path, natural_images):
    cfg = load_config(
        None,
        [
            "model.arch=vit_tiny",
            "model.depth=2",
            "model.img_size=32",
            "model.patch_size=4",
            "model.proj_hidden_dim=64",
            "model.proj_out_dim=32",
            "data.source=synthetic",
            "data.synthetic_size=16",
            "data.num_workers=0",
            "train.batch_size=8",
            "train.epochs=1",
            "train.max_steps=2",
            "train.precision=fp32",
            f"output_dir={tmp_path / 'run'}",
        ],
        default_preset="fashion_mnist",
    )
    pretrain(cfg)
    images = [str(p) for p in sorted(natural_images.glob("imagenet_*.jpg"))[:2]]
    assert len(images) == 2
    assert main(["visualize", str(tmp_path / "run"), *images, "--out", str(tmp_path / "viz")]) == 0
    written = sorted(p.name for p in (tmp_path / "viz").iterdir())
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    assert written == sorted([f"{s}_attention.png" for s in stems] + [f"{s}_retrieval.png" for s in stems])
    for name in written:  # attention: input | overlay; retrieval: masked | picked patches | correctness
        with Image.open(tmp_path / "viz" / name) as im:
            assert im.size == ((64, 32) if name.endswith("_attention.png") else (96, 32)) and im.mode == "RGB"
    # an exported encoder has no projectors: attention only
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "enc.safetensors")]) == 0
    assert main(["visualize", str(tmp_path / "enc.safetensors"), images[0], "--out", str(tmp_path / "viz2")]) == 0
    assert sorted(p.name for p in (tmp_path / "viz2").iterdir()) == [f"{stems[0]}_attention.png"]
