"""conmim visualize: the recomputed attention equals timm's own, and the command writes right-sized PNGs."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from PIL import Image

from conmim.cli import main
from conmim.config import load_config
from conmim.data.sources import DataError
from conmim.export.encoders import write_encoder
from conmim.models.conmim import ConMIM, timm_spec
from conmim.tools.visualize import last_block_attention, visualize
from conmim.train.engine import pretrain

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
            "precision=fp32",
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


@pytest.fixture
def exported_encoder(tmp_path) -> str:
    """A tiny encoder written as an export (safetensors + JSON): attention maps only."""
    spec = timm_spec("vit_tiny", 32, 4, depth=2)
    teacher = ConMIM("vit_tiny", 32, 4, depth=2, proj_hidden_dim=64, proj_out_dim=32).teacher.encoder
    weights = {k: v.contiguous() for k, v in teacher.state_dict().items()}
    return str(write_encoder(weights, spec, tmp_path / "enc.safetensors")[0])


def test_visualize_reads_folders_sorted_and_skips_other_files(tmp_path, natural_images, exported_encoder):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("b_second.jpg", "a_first.JPG"):
        shutil.copy(sorted(natural_images.glob("imagenet_*.jpg"))[0], folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()  # only the images directly in the folder
    shutil.copy(sorted(natural_images.glob("imagenet_*.jpg"))[1], folder / "nested" / "deeper.jpg")
    single = sorted(natural_images.glob("imagenet_*.jpg"))[2]
    written = visualize(exported_encoder, [folder, single], tmp_path / "viz")
    assert [p.name for p in written] == [
        "a_first_attention.png",
        "b_second_attention.png",
        f"{single.stem}_attention.png",
    ]
    assert all(p.is_file() for p in written)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d.mkdir(), "a folder with no image files"),
        (lambda d: (d.mkdir(), (d / "readme.txt").write_text("x")), "a folder with no image files"),
        (lambda d: d.write_text("plain text"), "not an image file that PIL can read"),  # named explicitly
        (lambda d: None, "no such image file or folder"),
    ],
    ids=["empty-folder", "folder-without-images", "not-an-image", "missing"],
)
def test_visualize_bad_inputs_fail_before_any_work(tmp_path, exported_encoder, capsys, make, message):
    target = tmp_path / "input"
    make(target)
    assert main(["visualize", exported_encoder, str(target), "--out", str(tmp_path / "viz")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(target) in err
    assert not (tmp_path / "viz").exists()


def test_visualize_refuses_two_inputs_that_would_write_the_same_png(tmp_path, natural_images, exported_encoder):
    image = sorted(natural_images.glob("imagenet_*.jpg"))[0]
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        shutil.copy(image, tmp_path / sub / "same.jpg")
    with pytest.raises(DataError, match="would both write same_"):
        visualize(exported_encoder, [tmp_path / "one", tmp_path / "two"], tmp_path / "viz")
