"""Dense transfer: the ViT feature pyramid (alone and inside torchvision's detectors), the built-in
scenes (masks against boxes, the ADE20K and COCO layouts read back by their loaders), the
segmentation metric against a hand-computed confusion matrix, bad segmentation input, and short
real ``conmim segment`` runs from a tiny pre-training checkpoint, with exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import FASHION_MNIST, TINY
from PIL import Image

from conmim.cli import main
from conmim.data.scenes import SceneParams, generate, scene
from conmim.data.sources import DataError
from conmim.dense.backbone import block_indices, build_backbone
from conmim.dense.data import ade20k_pairs, check_sizes, read_target
from conmim.dense.metrics import confusion, scores
from conmim.dense.model import build_segmenter, optimizer_groups
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


def test_fresh_scale_gives_a_pretrained_pyramid_a_fresh_patch_embedding():
    """``segment.fresh_scale`` / ``detect.fresh_scale``: a small pre-trained patch embedding (as ConMIM's
    official initialisation leaves it) is scaled, with the rest of the stream, to a fresh one's size."""
    weights, spec = _encoder("beit", 2, 16, 4)
    fresh_rms = weights["patch_embed.proj.weight"].pow(2).mean().sqrt().item()
    small = {k: v * 0.125 if k.startswith("patch_embed.") else v for k, v in weights.items()}
    rms = {}
    for fresh in (False, True):
        weight = build_backbone(small, spec, fresh_scale=fresh).encoder.patch_embed.proj.weight
        rms[fresh] = weight.pow(2).mean().sqrt().item()
    assert rms[False] == pytest.approx(fresh_rms * 0.125, rel=1e-5)
    assert rms[True] == pytest.approx(fresh_rms, rel=0.05)


def test_pyramid_levels_are_the_encoders_blocks():
    """Levels 2 and 3 of a 6-block BEiT are block 3's token map and block 5's max-pooled by 2, as the
    pre-trained encoder (one shared relative position table) computes them block by block."""
    from conmim.export.encoders import build_encoder

    weights, spec = _encoder("beit", 6, 32, 4)
    bb = build_backbone(weights, spec, drop_path=0.0).eval()
    enc = build_encoder(weights, spec).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = torch.cat([enc.cls_token, enc.patch_embed(x)], 1)
        maps = []
        for blk in enc.blocks:
            tokens = blk(tokens, shared_rel_pos_bias=enc.rel_pos_bias())
            maps.append(tokens[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2))
        out = bb(x)
    assert torch.allclose(out["2"], maps[3], atol=1e-5)
    assert torch.allclose(out["3"], torch.nn.functional.max_pool2d(maps[5], 2), atol=1e-5)


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
    from torchvision.datasets import CocoDetection

    image, anns = CocoDetection(str(scenes_dir / "images"), str(scenes_dir / "coco" / "instances_validation.json"))[0]
    assert image.size == (32, 32) and anns and all(a["category_id"] in range(1, 11) for a in anns)
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


def test_bad_input_errors_from_the_command(tmp_path, capsys, scenes_dir, tiny_run):
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
    assert (
        main(["segment", str(tiny_run), f"segment.data={scenes_dir}", "segment.num_classes=10", "segment.crop_size=30"])
        == 2
    )
    assert "resolution 30 is not a multiple of the encoder's patch size 4" in capsys.readouterr().err
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


def _crash_then_resume(monkeypatch, args: list[str], crash_step: int):
    """Run ``args`` killed at the start of iteration ``crash_step`` (after a checkpoint), then run it
    again; returns its output_dir."""
    import conmim.dense.loop as loop

    real_poly = loop.warmup_poly

    def crash(step, *rest):
        if step == crash_step:
            raise KeyboardInterrupt
        return real_poly(step, *rest)

    monkeypatch.setattr(loop, "warmup_poly", crash)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(loop, "warmup_poly", real_poly)
    assert main(args) == 0
    return Path(next(a for a in args if a.startswith("output_dir="))[len("output_dir=") :])


def _assert_same_end(a: Path, b: Path) -> None:
    """The same final weights and the same metrics, line by line, as the uninterrupted run."""
    state_a = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    state_b = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)  # bitwise
    assert (b / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()


def test_segment_runs_from_a_pretraining_run_and_resumes_exactly(tiny_run, scenes_dir, tmp_path, monkeypatch):
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
    size = Image.open(scenes_dir / "annotations" / "validation" / "scene_00000.png").size
    assert Image.open(a / "predictions.png").size == (3 * size[0] * 4, 6 * (size[1] + 2) * 4)

    b = _crash_then_resume(monkeypatch, _segment_args(tiny_run, scenes_dir, tmp_path / "b"), 5) / "segment"
    _assert_same_end(a, b)
    assert json.loads((b / "results.json").read_text())["mIoU"] == pytest.approx(result["mIoU"])


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_segment_stops_on_a_signal_with_a_checkpoint_and_resumes_exactly(
    tiny_run, scenes_dir, tmp_path, monkeypatch, name
):
    """A real signal to this process during iteration 3: the iteration finishes, a checkpoint is written
    (the periodic ones come every 2), the command exits 75, and the rerun ends as the uninterrupted run."""
    import os
    import signal

    import conmim.dense.loop as loop

    assert main(_segment_args(tiny_run, scenes_dir, tmp_path / "a")) == 0
    real_poly = loop.warmup_poly

    def signal_at_3(step, *rest):
        if step == 2:  # the lr of iteration 3 (0-based step 2)
            os.kill(os.getpid(), getattr(signal, name))
        return real_poly(step, *rest)

    monkeypatch.setattr(loop, "warmup_poly", signal_at_3)
    args = _segment_args(tiny_run, scenes_dir, tmp_path / "b")
    assert main(args) == 75
    assert torch.load(tmp_path / "b" / "segment" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(loop, "warmup_poly", real_poly)
    assert main(args) == 0
    _assert_same_end(tmp_path / "a" / "segment", tmp_path / "b" / "segment")


def test_prediction_picture_colours_truth_and_prediction_on_scored_pixels(tmp_path):
    from conmim.dense.data import IGNORE
    from conmim.dense.pictures import palette, prediction_picture

    target = torch.full((4, 6), IGNORE)
    target[1:3, 1:4] = 2
    image = torch.zeros(3, 4, 6)  # mean grey after denormalisation
    path = prediction_picture(
        [(image, target)],
        lambda img, size: torch.ones(size, dtype=torch.long),
        5,
        [0.5] * 3,
        [0.25] * 3,
        tmp_path / "p.png",
        scale=1,
    )
    grid = np.asarray(Image.open(path))
    assert grid.shape == (4 + 2, 3 * 6, 3)
    colours = palette(5)
    assert len({tuple(c) for c in colours}) == 6 and tuple(colours[-1]) == (0, 0, 0)
    assert (grid[1, 6 + 1] == colours[2]).all() and (grid[1, 12 + 1] == colours[1]).all()  # truth 2, predicted 1
    assert (grid[0, 6:] == 0).all()  # ignored pixels: black in truth and prediction
    assert (grid[0, 0] == 128).all()  # the image column: denormalised


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


def _detect_args(run, scenes, out, *extra):
    return [
        "detect",
        str(run),
        f"output_dir={out}",
        f"scenes.dir={scenes}",
        "scenes.train=24",
        "scenes.val=6",
        "scenes.size=32",
        "scenes.seed=3",
        "detect.img_size=32",
        "detect.out_channels=16",
        "detect.batch_size=2",
        "detect.iters=4",
        "detect.warmup_iters=1",
        "detect.log_every=1",
        "detect.checkpoint_every=2",
        *extra,
    ]


def test_detect_runs_from_a_pretraining_run_and_resumes(tiny_run, scenes_dir, tmp_path, monkeypatch):
    """Mask R-CNN on the pyramid: 4 real iterations on the built-in scenes' COCO files with scale
    jitter, pycocotools AP;
    interrupted after the checkpoint of iteration 2 and run again, it ends where an uninterrupted run does."""
    jitter = "detect.scale_range=[0.5,1.5]"  # large-scale jitter drawn by seed: resumed exactly too
    assert main(_detect_args(tiny_run, scenes_dir, tmp_path / "a", jitter)) == 0
    a = tmp_path / "a" / "detect"
    result = json.loads((a / "results.json").read_text())
    assert result["model"] == "mask_rcnn" and result["num_classes"] == 10 and result["images"] == 6
    assert all(0.0 <= result[k] <= 100.0 for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"))
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
    assert "val_segm_AP" in records[-1]

    _assert_same_end(
        a, _crash_then_resume(monkeypatch, _detect_args(tiny_run, scenes_dir, tmp_path / "b", jitter), 3) / "detect"
    )


def test_bad_coco_input_names_the_file(tmp_path, scenes_dir, capsys):
    from conmim.dense.coco import CocoInstances

    ann = json.loads((scenes_dir / "coco" / "instances_validation.json").read_text())
    images = scenes_dir / "images"
    cases = {
        "box": lambda a: a["annotations"][0].update(bbox=[20, 20, 30, 5]),
        "category": lambda a: a["annotations"][0].update(category_id=42),
        "image": lambda a: a["images"][0].update(file_name="validation/missing.png"),
    }
    messages = {
        "box": r"annotation 1 \(validation/scene_00000.png\): bbox \[20, 20, 30, 5\] is empty or outside the 32x32",
        "category": r"annotation 1 .*category_id 42 is not among the categories",
        "image": r"image 1 is .*validation/missing.png, which does not exist",
    }
    for name, change in cases.items():
        bad = json.loads(json.dumps(ann))
        change(bad)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=f"{path}: {messages[name]}"):
            CocoInstances(images, path, masks=True)
    args = [f"detect.train_images={images}", f"detect.train_ann={tmp_path / 'box.json'}"]
    args += [f"detect.val_images={images}", f"detect.val_ann={tmp_path}/x.json"]
    assert main(["detect", "x.safetensors", *args]) == 2
    assert "box.json: annotation 1" in capsys.readouterr().err


def test_segment_reads_a_generic_image_and_mask_folder_pair(tiny_run, scenes_dir, tmp_path):
    import shutil

    folders = {}
    for split, short in (("training", "train"), ("validation", "val")):
        for kind, src in (("images", "images"), ("masks", "annotations")):
            folders[f"{short}_{kind}"] = dst = tmp_path / f"{short}_{kind}"
            dst.mkdir()
            for f in sorted((scenes_dir / src / split).iterdir())[:6]:
                shutil.copy(f, dst / f.name)
    pair = [
        f"segment.images={folders['train_images']}",
        f"segment.masks={folders['train_masks']}",
        f"segment.val_images={folders['val_images']}",
        f"segment.val_masks={folders['val_masks']}",
    ]
    export = tmp_path / "enc.safetensors"
    assert main(["export", str(tiny_run), "--out", str(export)]) == 0  # an export is a source too
    args = [a for a in _segment_args(export, scenes_dir, tmp_path / "pair") if not a.startswith("segment.data=")]
    assert main([*args, *pair, "segment.iters=2", "segment.head=linear"]) == 0
    result = json.loads((tmp_path / "pair" / "segment" / "results.json").read_text())
    assert result["train_images"] == 6 and result["val_images"] == 6 and result["num_classes"] == 10


def test_warmup_poly_is_mmcvs_poly_with_linear_warmup():
    from conmim.train.schedules import warmup_poly

    # poly: (peak - final) * (1 - t / T) ** power + final; warm-up scales it by 1 - (1 - t / W) * (1 - ratio)
    assert warmup_poly(0, 100, 1.0, 10, 1e-6) == pytest.approx(1e-6)
    assert warmup_poly(5, 100, 1.0, 10, 0.0) == pytest.approx(0.95 * 0.5)
    assert warmup_poly(10, 100, 1.0, 10) == pytest.approx(0.9)
    assert warmup_poly(50, 100, 2.0, 10, power=2.0, final=0.5) == pytest.approx(1.5 * 0.25 + 0.5)
    assert warmup_poly(100, 100, 1.0, 10) == 0.0


def test_step_sampler_splits_each_batch_over_the_ranks():
    """Rank r of 2 reads the r-th half of every batch one process reads: disjoint, together the same."""
    from conmim.dense.data import StepSampler

    one = list(StepSampler(10, 4, 7, seed=1, start=2))
    halves = [list(StepSampler(10, 4, 7, seed=1, start=2, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*halves, strict=True)] == one
    assert all(len(b) == 2 for h in halves for b in h)
    with pytest.raises(DataError, match="a batch of 5 cannot be split evenly over 2 processes"):
        StepSampler(10, 5, 7, seed=1, world=2)


def _torchrun(tmp_path: Path, *args: str) -> list[list]:
    """``conmim ARGS`` under ``torchrun --nproc_per_node 2`` (gloo, CPU); each rank's batches."""
    import os
    import subprocess
    import sys

    worker = Path(__file__).parent / "scripts" / "dense_worker.py"
    record = tmp_path / "batches"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(record), *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(Path(f"{record}.rank{r}").read_text()) for r in range(2)]


@pytest.mark.slow
def test_torchrun_segment_splits_batches_and_reduces_the_evaluation(tiny_run, scenes_dir, tmp_path):
    """Two gloo ranks, total batch 4: each trains on its half of every batch (disjoint, together the
    one-process batch); rank 0 alone writes; the mIoU and confusion matrix of the sharded evaluation
    are those of one process evaluating the saved weights over all validation images."""
    import shutil

    from conmim.dense.data import StepSampler

    args = _segment_args(tiny_run, scenes_dir, tmp_path / "ddp", "segment.checkpoint_every=3")
    ranks = _torchrun(tmp_path, *args)
    expected = json.loads(json.dumps(list(StepSampler(24, 4, 6, seed=0))))  # pairs as json lists
    assert [a + b for a, b in zip(*ranks, strict=True)] == expected
    assert all({i for i, _ in a}.isdisjoint(i for i, _ in b) for a, b in zip(*ranks, strict=True))
    out = tmp_path / "ddp" / "segment"
    result = json.loads((out / "results.json").read_text())
    assert result["processes"] == 2 and result["iters"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # one writer
    assert len(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["rng"]) == 2

    # one process "resumes" the finished run: no training, its evaluation covers all 6 images itself
    shutil.copytree(tmp_path / "ddp", tmp_path / "one")
    assert main([a.replace(str(tmp_path / "ddp"), str(tmp_path / "one")) for a in args]) == 0
    single = json.loads((tmp_path / "one" / "segment" / "results.json").read_text())
    assert single["processes"] == 1 and single["val_pixels"] == result["val_pixels"]
    assert single["mIoU"] == pytest.approx(result["mIoU"])
    assert (tmp_path / "one" / "segment" / "confusion.json").read_text() == (out / "confusion.json").read_text()


@pytest.mark.slow
def test_torchrun_detect_runs_two_ranks(tiny_run, scenes_dir, tmp_path):
    """Mask R-CNN under DDP: 2 iterations of total batch 2, one image per rank, sharded detection
    scored on rank 0: the same AP as one process scoring the saved weights."""
    import shutil

    from conmim.dense.data import StepSampler

    args = _detect_args(tiny_run, scenes_dir, tmp_path / "ddp", "detect.iters=2")
    ranks = _torchrun(tmp_path, *args)
    assert [len(b) for r in ranks for b in r] == [1, 1, 1, 1]
    assert [a + b for a, b in zip(*ranks, strict=True)] == json.loads(json.dumps(list(StepSampler(24, 2, 2, seed=0))))
    result = json.loads((tmp_path / "ddp" / "detect" / "results.json").read_text())
    assert result["processes"] == 2 and result["images"] == 6
    shutil.copytree(tmp_path / "ddp", tmp_path / "one")
    assert main([a.replace(str(tmp_path / "ddp"), str(tmp_path / "one")) for a in args]) == 0
    single = json.loads((tmp_path / "one" / "detect" / "results.json").read_text())
    assert single["detections"] == result["detections"]
    assert single["bbox_AP"] == pytest.approx(result["bbox_AP"]) and single["segm_AP"] == pytest.approx(
        result["segm_AP"]
    )


def test_auxiliary_fcn_head_adds_its_weighted_loss_in_training_only(tiny_run, scenes_dir, tmp_path):
    """aux_weight 0.4: training returns the auxiliary logits, the loss is main + 0.4 x auxiliary, and
    gradients reach the FCN head; evaluation returns the logits alone. aux_weight 0: no FCN head."""
    from torch import nn

    from conmim.dense.model import segmentation_loss

    backbone = build_backbone(*_encoder("beit", 6, 32, 4))
    seg = build_segmenter(backbone, "upernet", 10, 24, 0.0, aux_weight=0.4)
    assert seg.aux.conv[0].out_channels == 8  # a third of UperNet's width
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2, 32, 32))
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    logits, aux = seg.train()(x)
    loss = segmentation_loss((logits, aux), y, criterion, 0.4)
    assert loss.item() == pytest.approx(criterion(logits, y).item() + 0.4 * criterion(aux, y).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.aux.parameters())
    assert isinstance(seg.eval()(x), torch.Tensor)
    no_aux = build_segmenter(backbone, "upernet", 10, 24, 0.0, aux_weight=0.0)
    assert no_aux.aux is None and not any(n.startswith("aux.") for n, _ in no_aux.named_parameters())

    args = _segment_args(tiny_run, scenes_dir, tmp_path / "aux", "segment.iters=2", "segment.aux_weight=0.4")
    assert main(args) == 0
    out = tmp_path / "aux" / "segment"
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert "aux.classifier.weight" in state and json.loads((out / "results.json").read_text())["aux_weight"] == 0.4
    assert main(["segment", "x.safetensors", "segment.aux_weight=-1"]) == 2


def test_large_scale_jitter_keeps_boxes_and_masks_together(scenes_dir):
    """ViTDet's jitter on the scenes (32 px, scale 0.1-2): every training image becomes 32 x 32 (cropped
    or padded), each kept box lies inside it and tightly around its mask (nearest-neighbour resizing
    moves an edge by at most a pixel), instances cut off entirely are dropped, draws repeat by seed."""
    from conmim.dense.coco import CocoInstances

    ann = scenes_dir / "coco" / "instances_training.json"
    data = CocoInstances(scenes_dir / "images", ann, masks=True, jitter=(0.1, 2.0), size=32)
    plain = CocoInstances(scenes_dir / "images", ann, masks=True)
    sizes, dropped = set(), 0
    for seed in range(40):
        image, target = data[(seed % len(data), seed)]
        assert image.shape == (3, 32, 32) and target["masks"].shape[1:] == (32, 32)
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) == len(target["masks"])
        assert bool((boxes >= 0).all() and (boxes <= 32).all() and (boxes[:, 2:] > boxes[:, :2]).all())
        for box, mask in zip(boxes, target["masks"], strict=True):
            ys, xs = mask.nonzero(as_tuple=True)
            if len(xs):
                assert xs.min() >= box[0] - 1.5 and xs.max() + 1 <= box[2] + 1.5
                assert ys.min() >= box[1] - 1.5 and ys.max() + 1 <= box[3] + 1.5
        dropped += len(plain[(seed % len(data), seed)][1]["boxes"]) - len(boxes)
        sizes.add(int((image.abs().sum(0) > 0).sum()))  # non-padding pixels: the drawn scale shows
    assert dropped > 0 and len(sizes) > 10
    again = data[(3, 3)]
    assert torch.equal(again[0], data[(3, 3)][0]) and torch.equal(again[1]["boxes"], data[(3, 3)][1]["boxes"])


def test_vitdet_preset_loads_and_validates(capsys):
    """``--config detect_vitdet --print-config``: ViTDet's ViT-B Mask R-CNN values resolve and validate."""
    import yaml

    assert main(["detect", "x.safetensors", "--config", "detect_vitdet", "--print-config"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)["detect"]
    assert (d["img_size"], d["scale_range"], d["out_channels"], d["batch_size"]) == (1024, [0.1, 2.0], 256, 64)
    assert (d["lr"], d["layer_decay"], d["weight_decay"], d["drop_path"]) == (1e-4, 0.7, 0.1, 0.1)
    assert (d["iters"], d["indices"], d["scales"], d["masks"]) == (184375, [11] * 4, [4.0, 2.0, 1.0, 0.5], True)
    assert main(["detect", "x.safetensors", "--config", "detect_vitdet", "detect.scale_range=[2.0,0.1]"]) == 2
    assert "detect.scale_range" in capsys.readouterr().err


def test_segmentation_models_pytorch_dpt_takes_an_export(tmp_path):
    """The docs/dense.md recipe: smp's DPT builds the export's timm encoder (``tu-`` + model name, the
    spec's kwargs but depth and in_chans) and timm loads the export's weights, unchanged, from the file."""
    smp = pytest.importorskip(
        "segmentation_models_pytorch",
        reason="segmentation-models-pytorch is not installed (pip install 'conmim[dense]')",
    )
    from conmim.export.encoders import read_spec, write_encoder

    weights, spec = _encoder("beit", 12, 32, 8)  # smp's own `depth` argument leaves timm's default: 12 blocks
    export, _ = write_encoder(weights, spec, tmp_path / "enc.safetensors")
    spec = read_spec(export)
    kwargs = {k: v for k, v in spec["kwargs"].items() if k not in ("depth", "in_chans")}
    model = smp.DPT(
        f"tu-{spec['model_name']}",
        encoder_weights="imagenet",  # "load pretrained weights": from the file named below
        encoder_depth=4,
        classes=10,
        pretrained_cfg_overlay=dict(file=str(export)),
        **kwargs,
    )
    state = model.encoder.model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], v) for k, v in weights.items())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10, 32, 32)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_segment_killed_at_a_random_iteration_resumes_bitwise(tiny_run, scenes_dir, tmp_path, ranks):
    """``kill -9`` of the whole process group (with two ranks: torchrun's agent and both workers) after
    a random iteration, then the same command again: the weights and metrics lines of an uninterrupted
    run with as many ranks, bit for bit (drop path draws from the checkpointed RNG states)."""
    import os
    import random
    import signal

    from reliability_utils import PYTHON, SEED, kill_group, last_step, records, run, start, wait_for, worker_pids

    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    launcher = launcher if ranks > 1 else [PYTHON]

    def command(out: Path) -> list[str]:
        extra = ("segment.iters=24", "segment.checkpoint_every=3", "segment.batch_size=4", "data.num_workers=0")
        return [*launcher, "-m", "conmim.cli", *_segment_args(tiny_run, scenes_dir, out, *extra)]

    done = run(command(tmp_path / "reference"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    at = random.Random(SEED + ranks).randint(4, 12)
    proc = start(command(tmp_path / "run"), tmp_path / "log.txt")
    wait_for(lambda: last_step(tmp_path / "run" / "segment") >= at, proc, timeout=240)
    for pid in worker_pids(proc).values():  # torchrun's workers run in a session of their own
        os.kill(pid, signal.SIGKILL)
    kill_group(proc)
    assert not (tmp_path / "run" / "segment" / "results.json").exists()  # the kill landed before the end
    done = run(command(tmp_path / "run"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed segment from" in done.stderr, f"(CONMIM_FAULT_SEED={SEED}, killed after {at})"
    _assert_same_end(tmp_path / "reference" / "segment", tmp_path / "run" / "segment")
    assert records(tmp_path / "run" / "segment") == records(tmp_path / "reference" / "segment")
