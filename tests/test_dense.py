"""Dense transfer: the ViT feature pyramid (alone and inside torchvision's detectors), the built-in
scenes (masks against boxes, the ADE20K and COCO layouts read back by their loaders), the
segmentation metric against a hand-computed confusion matrix, bad segmentation input, and short
real ``conmim segment`` runs from a tiny pre-training checkpoint, with exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from conftest import FASHION_MNIST, TINY
from PIL import Image

from conmim.cli import main
from conmim.data.sources import DataError
from conmim.dense.backbone import block_indices, build_backbone
from conmim.dense.data import ade20k_pairs, check_sizes, read_target
from conmim.dense.metrics import confusion, scores
from conmim.dense.model import build_segmenter, optimizer_groups
from conmim.dense.scenes import SceneParams, generate, scene
from conmim.models.conmim import timm_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder(encoder: str, depth: int, size: int, patch: int):
    spec = timm_spec("vit_tiny", size, patch, depth=depth, encoder=encoder)
    torch.manual_seed(0)
    return timm.create_model(spec["model_name"], **spec["kwargs"]).state_dict(), spec


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    """Small built-in scenes: 24 training and 6 validation scenes of 32 px."""
    return generate(tmp_path_factory.mktemp("dense") / "scenes", SceneParams(24, 6, 32, seed=3), FASHION_MNIST)


def test_block_indices_spread_as_beit():
    assert block_indices(12) == [3, 5, 7, 11]
    assert block_indices(24) == [7, 11, 15, 23]
    assert block_indices(6) == [1, 2, 3, 5]
    assert block_indices(2) == [0, 0, 0, 1]


@pytest.mark.parametrize(
    ("encoder", "depth", "size", "patch", "new_size", "strides"),
    [
        ("beit", 12, 32, 16, 64, [4, 8, 16, 32]),  # BEiT's pyramid, position tables resized 2x2 -> 4x4
        ("beit", 2, 16, 4, 32, [1, 2, 4, 8]),  # the small-patch encoders: strides relative to the patch
        ("vit", 6, 32, 8, 0, [2, 4, 8, 16]),  # absolute position embedding, pre-training size kept
    ],
)
def test_pyramid_shapes_and_strides(encoder, depth, size, patch, new_size, strides):
    bb = build_backbone(*_encoder(encoder, depth, size, patch), img_size=new_size)
    side = new_size or size
    assert bb.strides == strides and bb.indices == block_indices(depth) and bb.out_channels == 192
    out = bb(torch.randn(2, 3, side, side))
    assert list(out) == ["0", "1", "2", "3"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 192, side // s, side // s) for s in strides]
    # smaller inputs (a detection batch padded to a multiple of 32, a border window) are padded, maps cropped
    small = bb(torch.randn(1, 3, side - patch, side // 2))
    assert [tuple(v.shape[-2:]) for v in small.values()] == [
        (math.ceil((side - patch) / s), math.ceil(side // 2 / s)) for s in strides
    ]
    with pytest.raises(ValueError, match="larger than the backbone's resolution"):
        bb(torch.randn(1, 3, side + patch, side))


def test_pyramid_blocks_are_the_encoders_own():
    """Level 2 (scale 1) is block 3 of 6's token map exactly, as timm's encoder computes it."""
    weights, spec = _encoder("beit", 6, 32, 4)
    bb = build_backbone(weights, spec, drop_path=0.0).eval()
    ref = build_backbone(weights, spec, drop_path=0.0, indices=[3, 3, 3, 3], scales=[1, 1, 1, 1]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bb(x)["2"], ref(x)["0"], atol=1e-5)
        assert not torch.allclose(bb(x)["3"], torch.nn.functional.max_pool2d(ref(x)["1"], 2) * 0 + 1)


def test_layer_decay_matches_beit_rule():
    """Block i of L gets decay ** (L - i), the patch embedding decay ** (L + 1), neck and head 1."""
    seg = build_segmenter(build_backbone(*_encoder("beit", 6, 32, 4)), "upernet", 10, 32, 0.1)
    scale_of = {id(p): g["lr_scale"] for g in optimizer_groups(seg, 0.05, 0.5) for p in g["params"]}
    named = dict(seg.named_parameters())
    assert scale_of[id(named["backbone.encoder.blocks.5.attn.qkv.weight"])] == pytest.approx(0.5)
    assert scale_of[id(named["backbone.encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(0.5**6)
    assert scale_of[id(named["backbone.encoder.patch_embed.proj.weight"])] == pytest.approx(0.5**7)
    assert scale_of[id(named["head.classifier.weight"])] == 1.0
    assert len(scale_of) == len(named)


def _detection_targets(params: SceneParams, count: int):
    from conmim.data.sources import fashion_mnist

    items = fashion_mnist(FASHION_MNIST, "test")
    images, targets = [], []
    for i in range(count):
        sc = scene(params, "validation", i, items)
        images.append(torch.from_numpy(sc.image).permute(2, 0, 1).float() / 255)
        targets.append(
            {
                "boxes": torch.tensor(sc.boxes, dtype=torch.float32),
                "labels": torch.tensor(sc.labels),
                "masks": torch.from_numpy(np.stack(sc.masks)).to(torch.uint8),
            }
        )
    return images, targets


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_pyramid_in_torchvision_detectors(kind):
    """The pyramid as torchvision expects a backbone: one training step (all losses finite, weights
    move) and one evaluation (boxes inside the image) of Faster / Mask R-CNN on real scenes."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    bb = build_backbone(*_encoder("beit", 2, 16, 4), img_size=64, out_channels=32)
    names = list(bb(torch.zeros(1, 3, 64, 64)))
    common = dict(
        num_classes=11,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(((4,), (8,), (16,), (32,)), ((0.5, 1.0, 2.0),) * 4),
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
    )
    model = (
        MaskRCNN(bb, mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), **common)
        if kind == "mask"
        else FasterRCNN(bb, **common)
    )
    images, targets = _detection_targets(SceneParams(size=64), 2)
    if kind == "faster":
        for t in targets:
            t.pop("masks")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = bb.encoder.blocks[0].attn.qkv.weight.detach().clone()
    model.train()
    losses = model(images, targets)
    assert ("loss_mask" in losses) == (kind == "mask")
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert not torch.equal(before, bb.encoder.blocks[0].attn.qkv.weight)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
    assert (out[0]["boxes"] >= 0).all() and (out[0]["boxes"] <= 64).all()
    if kind == "mask":
        assert out[0]["masks"].shape[1:] == (1, 64, 64)


def test_metric_against_hand_computed_confusion():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    # rows = truth, columns = prediction, the ignored pixel left out; class 3 never in the truth
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    m = confusion(pred, target, 4)
    assert torch.equal(m, expected)
    s = scores(m, ["a", "b", "c", "d"])
    # IoU: a 1/(2+2-1), b 2/(3+3-2), c 1/(2+1-1), d 0/(0+1-0); accuracy: a 1/2, b 2/3, c 1/2, d none
    assert s["per_class"]["a"]["IoU"] == pytest.approx(100 / 3)
    assert s["per_class"]["b"]["IoU"] == pytest.approx(50.0)
    assert s["per_class"]["c"]["IoU"] == pytest.approx(50.0)
    assert s["per_class"]["d"] == {"IoU": 0.0, "Acc": None}
    assert s["mIoU"] == pytest.approx((100 / 3 + 50 + 50 + 0) / 4)
    assert s["mAcc"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert s["aAcc"] == pytest.approx(100 * 4 / 7) and s["pixels"] == 7
    assert math.isnan(scores(torch.zeros(2, 2, dtype=torch.long))["mIoU"])


def test_scenes_masks_boxes_and_both_layouts(scenes_dir):
    from pycocotools.coco import COCO

    meta = json.loads((scenes_dir / "scenes.json").read_text())
    assert meta["num_classes"] == 10 and meta["params"]["seed"] == 3
    pairs = ade20k_pairs(scenes_dir, "training")
    assert len(pairs) == 24 and len(ade20k_pairs(scenes_dir, "validation")) == 6
    check_sizes(pairs)
    coco = COCO(str(scenes_dir / "coco" / "instances_training.json"))
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    instances = 0
    for info in coco.loadImgs(coco.getImgIds()):
        image = np.asarray(Image.open(scenes_dir / "images" / info["file_name"]))
        semantic = np.asarray(Image.open(scenes_dir / "annotations" / info["file_name"]))
        assert image.shape == (32, 32, 3) and image.std() > 5  # a background that is not blank
        union = np.zeros_like(semantic)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
            mask = coco.annToMask(ann).astype(bool)
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)  # tight box
            assert mask.sum() == ann["area"] >= 16
            assert (semantic[mask] == ann["category_id"]).all()
            assert not (union[mask]).any()  # visible parts do not overlap
            union[mask] = ann["category_id"]
            instances += 1
        assert np.array_equal(union, semantic)  # the class mask is exactly the union of the instances
    assert instances >= 24 * 2 * 0.7
    items = __import__("conmim.data.sources", fromlist=["fashion_mnist"]).fashion_mnist(FASHION_MNIST, "train")
    again = scene(SceneParams(24, 6, 32, seed=3), "training", 5, items)
    assert np.array_equal(again.image, np.asarray(Image.open(pairs[5][0])))  # deterministic by seed
    other = scene(SceneParams(24, 6, 32, seed=4), "training", 5, items)
    assert not np.array_equal(other.image, again.image)


def test_bad_segmentation_input_names_the_file(tmp_path, scenes_dir):
    img, mask = ade20k_pairs(scenes_dir, "validation")[0]
    target = read_target(mask, 10)
    raw = np.asarray(Image.open(mask))
    assert (target[raw == 0] == 255).all() and (target[raw > 0] == raw[raw > 0] - 1).all()
    with pytest.raises(DataError, match=rf"{mask}: class id \d+ beyond the 3 classes"):
        read_target(mask, 3)
    images, masks = tmp_path / "im", tmp_path / "ma"
    images.mkdir(), masks.mkdir()
    Image.open(img).save(images / "a.png")
    Image.open(mask).resize((16, 16)).save(masks / "a.png")
    with pytest.raises(DataError, match=r"a\.png: mask is 16x16 but its image .*a\.png is 32x32"):
        check_sizes([(images / "a.png", masks / "a.png")])
    Image.open(img).save(images / "b.jpg")
    folders = [f"segment.images={images}", f"segment.masks={masks}", f"segment.val_images={images}"]
    args = ["segment", "unused.safetensors", *folders, f"segment.val_masks={masks}", "segment.num_classes=10"]
    assert main(args) == 2  # before any weights are read


def test_bad_input_errors_from_the_command(tmp_path, capsys, scenes_dir):
    images, masks = tmp_path / "im", tmp_path / "ma"
    images.mkdir(), masks.mkdir()
    img, mask = ade20k_pairs(scenes_dir, "validation")[0]
    Image.open(img).save(images / "a.png")
    Image.open(img).save(images / "b.jpg")
    Image.open(mask).save(masks / "a.png")
    folders = [f"segment.images={images}", f"segment.masks={masks}", f"segment.val_images={images}"]
    assert main(["segment", "x.safetensors", *folders, f"segment.val_masks={masks}", "segment.num_classes=10"]) == 2
    assert f"{images / 'b.jpg'}: no mask for this image (expected {masks / 'b.png'})" in capsys.readouterr().err
    assert main(["segment", "x.safetensors", f"segment.data={scenes_dir}"]) == 2
    assert "segment.num_classes=0 is not allowed" in capsys.readouterr().err
    assert main(["segment", "x.safetensors", "segment.head=fcn"]) == 2
    assert "segment.head='fcn' is not allowed: one of upernet, linear" in capsys.readouterr().err
    assert main(["segment", "x.safetensors", "--config", "segment_cpu", "segment.init=scratch"]) == 2  # after --config
    assert "segment.init='scratch' is not allowed: pretrained or random" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real tiny pre-training run (4 ConMIM steps on Fashion-MNIST, 16 px, patch 4, 2 blocks)."""
    run = tmp_path_factory.mktemp("dense") / "run"
    assert main(["pretrain", *TINY, "train.max_steps=4", f"output_dir={run}"]) == 0
    return run


def _segment_args(run, scenes, out, *extra):
    return [
        "segment",
        str(run),
        f"output_dir={out}",
        f"segment.data={scenes}",
        "segment.num_classes=10",
        "segment.crop_size=32",
        "segment.base_size=32",
        "segment.channels=16",
        "segment.batch_size=4",
        "segment.iters=6",
        "segment.warmup_iters=2",
        "segment.log_every=1",
        "segment.checkpoint_every=2",
        "segment.lr=1e-3",
        *extra,
    ]


def test_segment_runs_from_a_pretraining_run_and_resumes_exactly(tiny_run, scenes_dir, tmp_path, monkeypatch):
    import conmim.dense.segment as seg

    assert main(_segment_args(tiny_run, scenes_dir, tmp_path / "a")) == 0
    a = tmp_path / "a" / "segment"
    result = json.loads((a / "results.json").read_text())
    assert result["iters"] == 6 and result["strides"] == [1, 2, 4, 8] and result["val_images"] == 6
    assert 0 <= result["mIoU"] <= 100 and result["val_pixels"] > 0
    assert set(result["per_class"]) == set(json.loads((scenes_dir / "scenes.json").read_text())["classes"])
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["val_mIoU"] == pytest.approx(result["mIoU"])
    assert (a / "tensorboard").is_dir() and (a / "config.yaml").is_file()

    real_poly = seg.warmup_poly

    def crash_at_step_5(step, *args):
        if step == 5:
            raise KeyboardInterrupt  # killed after the checkpoint of step 4
        return real_poly(step, *args)

    monkeypatch.setattr(seg, "warmup_poly", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        main(_segment_args(tiny_run, scenes_dir, tmp_path / "b"))
    monkeypatch.setattr(seg, "warmup_poly", real_poly)
    assert main(_segment_args(tiny_run, scenes_dir, tmp_path / "b")) == 0
    b = tmp_path / "b" / "segment"
    state_a = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    state_b = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(state_a[k].float(), state_b[k].float(), atol=1e-6) for k in state_a)
    assert (b / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()
    assert json.loads((b / "results.json").read_text())["mIoU"] == pytest.approx(result["mIoU"])


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_segment_linear_probe_moves_only_the_head(tiny_run, scenes_dir, tmp_path, init):
    from conmim.export.encoders import load_pretrained

    args = _segment_args(tiny_run, scenes_dir, tmp_path / "lin", "segment.head=linear", "segment.iters=3")
    assert main([*args, f"segment.init={init}"]) == 0
    state = torch.load(tmp_path / "lin" / "segment" / "checkpoints" / "last.pt", weights_only=True)["model"]
    weights, _ = load_pretrained(tiny_run)
    kept = torch.equal(state["backbone.encoder.blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])
    assert kept == (init == "pretrained")
    assert set(state) >= {"head.classifier.weight", "head.norm.running_mean"}
    assert json.loads((tmp_path / "lin" / "segment" / "results.json").read_text())["init"] == init
