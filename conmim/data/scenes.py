"""Built-in dense data: scenes composited from real Fashion-MNIST garments, with every label.

Each scene places 2-5 garments (random item, size, position; later ones occlude earlier ones) on a
background that is never blank (a smooth random colour field plus a linear gradient and fine
noise), and tints each garment with a random colour, its texture kept from the original grey
levels. A garment's shape is its pixels brighter than ``ITEM_THRESHOLD`` of the resized image.

Labels follow ADE20K's convention: in the class masks 0 means "not labelled, ignored" and garment
class ``c`` of Fashion-MNIST (0-9) is stored as ``c + 1`` (1-10). The background is 0: as in
ADE20K's unlabelled pixels it is ignored by the loss and the metrics, so a segmentation model is
scored on naming each garment pixel's class. Visible fragments smaller than ``MIN_AREA`` pixels
(mostly hidden by later garments) are set to 0 as well and get no instance. Everything is a pure
function of the seed: scene ``i`` of a split draws from ``numpy.random.default_rng([seed, split, i])``;
training scenes use Fashion-MNIST's training images, validation scenes its test images.

``data.source=scenes`` makes the training scenes' images (no labels) the pre-training data
(:func:`scene_images`): the same folder the dense commands read, generated on first use.

Written layouts, both read by the ordinary loaders:
``images/{training,validation}/scene_NNNNN.png`` + ``annotations/{training,validation}/scene_NNNNN.png``
(ADE20K's, for ``conmim segment``) and ``coco/instances_{training,validation}.json`` (COCO: boxes as
``[x, y, w, h]``, masks as uncompressed RLE, category ids 1-10, ``file_name`` relative to ``images/``),
plus ``scenes.json`` with the parameters and class names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..runtime import distributed
from .sources import (
    FASHION_CLASSES,
    FASHION_MNIST_DIR,
    DataError,
    FileSource,
    Source,
    build_source,
    fashion_mnist,
    image_folder,
)

log = logging.getLogger(__name__)

SPLITS = {"training": "train", "validation": "test"}  # scene split -> Fashion-MNIST split
# data.split / data.eval_split -> scene split, for data.source=scenes
SPLIT_NAMES = {"train": "training", "test": "validation", "val": "validation"}
SPLIT_NAMES.update({name: name for name in SPLITS})
ITEM_THRESHOLD = 0.1  # of full brightness: a garment's pixels
MIN_AREA = 16  # visible pixels an instance needs to be kept


@dataclass(frozen=True)
class SceneParams:
    """What a set of scenes is a function of (stored in ``scenes.json``; a cache hit needs all equal)."""

    train: int = 2000
    val: int = 200
    size: int = 64
    seed: int = 0
    min_items: int = 2
    max_items: int = 5
    min_scale: float = 0.3  # garment side as a fraction of the canvas side
    max_scale: float = 0.6


@dataclass
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    semantic: np.ndarray  # (S, S) uint8: 0 ignore / background, 1-10 garment class + 1
    masks: list[np.ndarray]  # per instance (S, S) bool, visible pixels
    labels: list[int]  # per instance, 1-10
    boxes: list[tuple[int, int, int, int]]  # per instance x0, y0, x1, y1 (exclusive), tight around the mask


def _resize(arr: np.ndarray, size: int, resample=Image.BICUBIC) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((size, size), resample))


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour field (a 4x4 random grid, bicubic) + a linear gradient in a random direction + noise."""
    field = _resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), size).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    ends = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    gradient = ends[0] + (ends[1] - ends[0]) * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    noise = rng.normal(0, 8, (size, size, 3))
    return np.clip(0.5 * field + 0.5 * gradient + noise, 0, 255).astype(np.uint8)


def compose(rng: np.random.Generator, items, p: SceneParams) -> Scene:
    """One scene from a source of (28x28 grey image, class) items."""
    s = p.size
    canvas = background(rng, s).astype(np.float32)
    semantic = np.zeros((s, s), np.uint8)
    owner = np.zeros((s, s), np.int32)  # 1-based instance that is visible at each pixel
    labels = []
    for k in range(int(rng.integers(p.min_items, p.max_items + 1))):
        img, cls = items[int(rng.integers(len(items)))]
        side = max(int(round(rng.uniform(p.min_scale, p.max_scale) * s)), 4)
        grey = _resize(np.asarray(img.convert("L")), side).astype(np.float32) / 255
        shape = grey > ITEM_THRESHOLD
        y, x = (int(v) for v in rng.integers(0, s - side + 1, 2))
        colour = rng.uniform(40, 255, 3).astype(np.float32)
        patch = colour * (0.35 + 0.65 * grey[..., None])
        region = (slice(y, y + side), slice(x, x + side))
        canvas[region][shape] = patch[shape]
        semantic[region][shape] = cls + 1
        owner[region][shape] = k + 1
        labels.append(cls + 1)
    masks, kept, boxes = [], [], []
    for k, label in enumerate(labels):
        mask = owner == k + 1
        if mask.sum() < MIN_AREA:
            semantic[mask] = 0
            continue
        ys, xs = np.nonzero(mask)
        masks.append(mask)
        kept.append(label)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return Scene(canvas.round().astype(np.uint8), semantic, masks, kept, boxes)


def scene(p: SceneParams, split: str, index: int, items) -> Scene:
    """Scene ``index`` of ``split`` (training | validation): the same for the same parameters, always."""
    return compose(np.random.default_rng([p.seed, list(SPLITS).index(split), index]), items, p)


def rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed run-length encoding: runs of 0 then 1 alternately, column-major."""
    flat = np.asfortranarray(mask).reshape(-1, order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _write_split(root: Path, split: str, count: int, p: SceneParams, items, categories) -> None:
    images, annotations = [], []
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for i in range(count):
        sc = scene(p, split, i, items)
        name = f"scene_{i:05d}.png"
        Image.fromarray(sc.image).save(root / "images" / split / name)
        Image.fromarray(sc.semantic, mode="L").save(root / "annotations" / split / name)
        images.append({"id": i + 1, "file_name": f"{split}/{name}", "width": p.size, "height": p.size})
        for mask, label, (x0, y0, x1, y1) in zip(sc.masks, sc.labels, sc.boxes, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": rle(mask),
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "coco").mkdir(exist_ok=True)
    (root / "coco" / f"instances_{split}.json").write_text(json.dumps(coco))


def generate(out: str | os.PathLike, params: SceneParams, fashion_mnist_dir: str | os.PathLike) -> Path:
    """Write the scenes of ``params`` to ``out`` (atomically: a temporary folder renamed at the end)."""
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; scenes are written to a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        categories = [{"id": c + 1, "name": n, "supercategory": "garment"} for c, n in enumerate(FASHION_CLASSES)]
        for split, count in (("training", params.train), ("validation", params.val)):
            _write_split(tmp, split, count, params, fashion_mnist(fashion_mnist_dir, SPLITS[split]), categories)
        meta = {"params": asdict(params), "num_classes": len(FASHION_CLASSES), "classes": list(FASHION_CLASSES)}
        (tmp / "scenes.json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure(out: str | os.PathLike, params: SceneParams, fashion_mnist_dir: str | os.PathLike) -> Path:
    """The scenes of ``params`` in ``out``: generated on first use, reused after; other parameters are an error."""
    out = Path(out)
    meta = out / "scenes.json"
    if not out.exists():
        return generate(out, params, fashion_mnist_dir)
    if not meta.is_file():
        raise DataError(f"{out}: exists but holds no scenes.json; choose another scenes.dir")
    stored = json.loads(meta.read_text())["params"]
    if stored != asdict(params):
        diff = {k: (stored.get(k), v) for k, v in asdict(params).items() if stored.get(k) != v}
        raise DataError(
            f"{out} holds scenes made with other parameters (stored, asked): {diff}; "
            "choose another scenes.dir or delete that folder"
        )
    return out


def builtin(sc, data_cfg) -> Path:
    """The folder of the scenes a ``scenes`` section asks for, generated on first use from the garments
    of ``data.path`` (when ``data.source`` is ``fashion_mnist`` or ``scenes``; else Debian's copy).
    Under torchrun rank 0 writes them while the others wait, so no two processes write the same files."""
    params = SceneParams(sc.train, sc.val, sc.size, sc.seed)
    garments = data_cfg.path if data_cfg.source in ("fashion_mnist", "scenes") else FASHION_MNIST_DIR
    with distributed.main_first():
        if not Path(sc.dir).exists():
            log.info("writing the built-in scenes to %s (%d training, %d validation)", sc.dir, sc.train, sc.val)
        return ensure(sc.dir, params, garments)


def scene_split(split: str) -> str:
    """The scene split (training | validation) that a ``data.split`` name stands for."""
    if split not in SPLIT_NAMES:
        raise DataError(f"data.split={split!r}: the scenes have the splits {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES[split]


def scene_images(sc, data_cfg, split: str) -> FileSource:
    """The images of one split of the built-in scenes, unlabelled (label -1): pre-training data."""
    return image_folder(builtin(sc, data_cfg) / "images" / scene_split(split))


def source_for(cfg, split: str | None = None) -> Source:
    """The images ``cfg.data`` names for ``split`` (default ``data.split``): the built-in scenes of
    ``cfg.scenes`` for ``data.source=scenes``, else :func:`conmim.data.sources.build_source`.
    Pre-training and ``conmim stats`` read their data through it; the labelled commands do not, since
    the scenes carry no image labels."""
    split = cfg.data.split if split is None else split
    if cfg.data.source == "scenes":
        return scene_images(cfg.scenes, cfg.data, split)
    return build_source(cfg.data, cfg.model.img_size, split, cfg.model.in_chans)
