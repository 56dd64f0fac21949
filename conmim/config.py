"""Typed configuration shared by every `conmim` command.

One dataclass tree, loaded from YAML presets and dotted ``key=value`` overrides through OmegaConf.
Unknown keys and wrongly typed values are rejected by OmegaConf itself; the checks in
:func:`validate` catch values that are well typed but meaningless, before any work starts, and name
the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")
NAN_POLICIES = ("restore", "stop")
ENCODERS = ("beit", "vit")
POS_EMBEDS = ("none", "mask_sincos", "sincos", "sincos_fixed")
REL_POS_INITS = ("zero", "locality")
ENCODER_INITS = ("pretrained", "random")  # random: timm's initialisation of the same architecture (scratch)
OBJECTIVES = ("conmim", "pixel")
MASK_TYPES = ("random_unit", "block", "random")
SOURCES = ("fashion_mnist", "folder", "list", "webdataset", "synthetic")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and what is allowed."""


@dataclass
class ModelConfig:
    objective: str = "conmim"  # conmim: denoising contrast; pixel: MAE/SimMIM-style baseline (conmim.models.pixel_mim)
    arch: str = "vit_small"
    encoder: str = "beit"  # beit: shared relative position bias (official); vit: absolute position embedding
    # beit only: none (official: no absolute position embedding) | mask_sincos (fixed 2-D sin-cos added to
    # the student's mask tokens only; the encoder keeps the official layout) | sincos (encoder embedding,
    # 2-D sin-cos init, learned) | sincos_fixed (the same, frozen); docs/results.md compares them
    pos_embed: str = "none"
    rel_pos_init: str = "zero"  # beit only: zero (official) | locality (bias -slope * distance per head)
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    depth: int = 0  # 0: the arch's depth (12, or 24 for vit_large)
    init_values: float = 0.1  # layer scale; the paper's ViT-L run uses 1e-5
    drop_path: float = 0.0
    teacher_drop_path: float = 0.0
    proj_hidden_dim: int = 4096
    proj_out_dim: int = 256
    temperature: float = 0.1
    sync_bn: bool = False  # official: projector BatchNorm per process
    teacher_bn_eval: bool = False  # official: teacher BatchNorm uses batch statistics
    trunc_normal_1std: bool = True  # official pre-training init quirk: truncate at +-1 std
    # continued pre-training: student and teacher start from these weights (a conmim run or checkpoint, an
    # export, a timm state dict, an official checkpoint), resized to this model's grid; "" = fresh init
    init: str = ""


@dataclass
class MaskConfig:
    type: str = "random_unit"
    ratio: float = 0.75
    unit: int = 2  # random_unit: units of unit x unit patches (official random_mps32 = 2 at patch 16)
    min_block_patches: int = 16  # block: smallest block, in patches
    block_aspect: float = 0.3  # block: aspect ratio drawn log-uniformly in [aspect, 1/aspect]


@dataclass
class DataConfig:
    source: str = "fashion_mnist"
    # The data root. Folder sources: data.path/<split>/[<class>/]*.jpg; list sources: <path w/o .txt>_<split>.txt;
    # split "." means data.path itself (conmim.data.sources.split_location, used by every command).
    # webdataset: a folder of <split>/*.tar, or a shard file / brace pattern, {split} standing for the split
    path: str = "/usr/share/datasets/fashion-mnist"
    split: str = "train"  # training images: pre-training, and the k-NN bank / probe / fine-tuning train set
    num_workers: int = 2
    crop_scale_min: float = 0.08
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    strong_aug: bool = True  # photometric ops on the teacher's view
    weak_aug_strong: bool = False  # ablation: strong photometric ops on the student's view too
    synthetic_size: int = 1024
    on_error: str = "skip"  # skip | raise, for unreadable image files (and damaged tar shards)
    eval_split: str = "test"  # labelled held-out split of knn / linprobe / finetune (ImageNet folder: val)
    # folder/list/webdataset: workers only read the encoded bytes; decode + views run batched on the device
    gpu_aug: bool = False


@dataclass
class TrainConfig:
    batch_size: int = 64  # per process
    epochs: int = 300
    max_steps: int = 0  # 0: no cap
    base_lr: float = 1.5e-4  # lr = base_lr * total_batch / 256
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    weight_decay_end: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    clip_grad: float = 3.0  # 0: no clipping (the norm is still logged)
    grad_checkpointing: bool = False  # recompute the student's block activations in backward: less memory, slower
    momentum: float = 0.996  # teacher EMA, cosine to momentum_end
    momentum_end: float = 1.0
    accum_steps: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False
    decay_mask_token: bool = True  # official quirk: weight decay on the mask token
    decay_rel_pos: bool = True  # official quirk: weight decay on the relative position table
    log_every: int = 20
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    seed: int = 0
    # Non-finite loss or gradients: the step is skipped (optimizer and teacher untouched); after
    # max_bad_steps consecutive skipped steps, restore the last checkpoint from before them with the
    # lr multiplied by nan_lr_factor (at most nan_max_restores times), or stop (nan_policy=stop).
    nan_policy: str = "restore"
    max_bad_steps: int = 20
    nan_lr_factor: float = 0.5
    nan_max_restores: int = 3
    dist_timeout_s: float = 600.0  # a collective waiting longer than this (dead or hung rank) fails


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_t: float = 0.07
    pool: str = "mean"  # mean (patch tokens, what ConMIM trains) | cls (never in the loss); docs/evaluation.md
    batch_size: int = 256
    train_limit: int = 0  # knn / linprobe / finetune: images of data.split used, drawn with train.seed (0: all)
    test_limit: int = 0  # ... and of data.eval_split (0: all)
    which: str = "teacher"  # encoder of a conmim checkpoint for knn / linprobe / finetune (the authors': teacher)
    final_knn: bool = False  # after pre-training, k-NN and linear probe of teacher vs random init (built-in default)
    final_min_steps: int = 100  # ... skipped (with a log line) for runs shorter than this
    monitor_every: int = 0  # pre-training steps between k-NN checks of the teacher (0: off)
    monitor_bank: int = 2000  # labelled pre-training images as the monitor's memory bank
    monitor_queries: int = 1000  # other labelled pre-training images as its queries


@dataclass
class LinProbeConfig:
    """Linear probe (ours; the paper reports none, docs/method.md §11.4): MAE's protocol scaled to the data."""

    block: int = -1  # which block's tokens (-1: the last; the final norm is applied to any block)
    pool: str = "mean"  # mean | cls, as eval.pool
    cache_features: bool = True  # extract features once (no augmentation), train the head on the cache
    optimizer: str = "sgd"  # sgd | lars
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 256
    base_lr: float = 0.1  # lr = base_lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class FinetuneConfig:
    """Full fine-tuning, docs/method.md §11.1 (official ViT-B ImageNet recipe) unless a preset says otherwise."""

    img_size: int = 0  # 0: the pre-training resolution; another size resizes the position tables
    # pretrained: start from SOURCE's weights; random: the same architecture with timm's initialisation
    # (seeded by train.seed), the from-scratch baseline under the same recipe
    init: str = "pretrained"
    epochs: int = 100
    warmup_epochs: float = 20.0
    batch_size: int = 128  # per process
    base_lr: float = 1.0e-3  # lr = base_lr * total_batch / 256 (official: 4e-3 at batch 1024)
    min_lr: float = 1.0e-6
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 0.0  # 0: none (official)
    drop_path: float = 0.1
    head_init_scale: float = 0.001
    # true (official): the final norm is dropped and a new fc_norm normalises the mean token; false: the
    # pre-trained final norm stays on every token before the mean (docs/evaluation.md measures both)
    fc_norm: bool = True
    # > 0: before fine-tuning, fit the new head for this many epochs on the frozen classifier's cached
    # head inputs (linear probe, then fine-tune), with linprobe's optimizer; 0: the official random head
    probe_head_epochs: int = 0
    # true: scale the transferred residual stream (same function) so the patch embedding is as large as a
    # fresh one; AdamW then moves pre-trained and fresh weights by the same share (docs/evaluation.md).
    # Ignored with init=random: timm's initialisation already has fresh sizes.
    fresh_scale: bool = False
    decay_rel_pos: bool = True  # official quirk: weight decay on the per-block relative position tables
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    crop_scale_min: float = 0.08  # RandomResizedCrop area scale (timm default, official)
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; "" for none (then color_jitter)
    color_jitter: float = 0.4  # timm's colour jitter strength without RandAugment (RGB models); 0: none
    reprob: float = 0.25  # random erasing
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, centre-crop img_size (224/256)
    num_classes: int = 0  # 0: from the training split's labels
    log_every: int = 20


SEGMENT_HEADS = ("upernet", "linear")


@dataclass
class ScenesConfig:
    """The built-in dense data (``conmim/dense/scenes.py``), used by ``conmim segment`` and ``conmim
    detect`` when they are given no data: generated into ``dir`` on first use from ``data.path``'s
    Fashion-MNIST files, reused after."""

    dir: str = "data/scenes"
    train: int = 2000
    val: int = 200
    size: int = 64
    seed: int = 0


@dataclass
class DenseTrainConfig:
    """What ``segment`` and ``detect`` share: the encoder as a pyramid and the iteration schedule."""

    # The encoder's blocks `indices` ([]: spread as 3/5/7/11 of 12) rescaled by `scales` relative to
    # the token grid (strides patch/scale); pretrained | random (timm's initialisation: the scratch baseline).
    init: str = "pretrained"
    indices: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    drop_path: float = 0.1
    flip: bool = True  # horizontal flips in training
    # Iterations of AdamW with layer-wise lr decay, linear warm-up from lr * warmup_ratio, then poly.
    iters: int = 300
    batch_size: int = 8
    lr: float = 2.0e-4  # peak, absolute (BEiT's configs give it at their total batch of 16)
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_iters: int = 30
    warmup_ratio: float = 1.0e-6
    power: float = 1.0
    min_lr: float = 0.0
    val_limit: int = 0  # evaluate on the first N validation images (0: all)
    eval_every: int = 0  # iterations between evaluations (0: only at the end)
    log_every: int = 20
    checkpoint_every: int = 100


@dataclass
class SegmentConfig(DenseTrainConfig):
    """``conmim segment`` (docs/dense.md). Defaults: a CPU-sized run on the built-in scenes; the
    ``segment_ade20k`` preset holds BEiT's ADE20K recipe."""

    # Data: an ADE20K-layout root (images/<split>, annotations/<split>), or a pair of folders
    # (images, masks and val_images, val_masks), or neither: the built-in scenes (the scenes section).
    data: str = ""
    train_split: str = "training"
    val_split: str = "validation"
    images: str = ""
    masks: str = ""
    val_images: str = ""
    val_masks: str = ""
    num_classes: int = 0  # 0: from the scenes' scenes.json (required for other data)
    head: str = "upernet"  # upernet (fine-tunes everything) | linear (frozen encoder, BN + 1x1 conv: the probe)
    channels: int = 128  # UperNet width (BEiT: 768)
    dropout: float = 0.1
    # Auxiliary FCN head on the second-coarsest level (training only; BEiT's ADE20K: 0.4); 0: none.
    # UperNet only: the linear probe has no auxiliary head.
    aux_weight: float = 0.0
    crop_size: int = 64  # training crops and evaluation windows; the backbone's resolution
    base_size: int = 64  # short side before the random scale (ADE20K: 512); 0 = images as they are
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    # Evaluation: windows of crop_size every eval_stride px (0: 2/3 of the crop), logits averaged and
    # resized to the original image before the argmax.
    eval_stride: int = 0
    pictures: int = 6  # predictions.png: image | truth | prediction for the first N validation images (0: none)


@dataclass
class DetectConfig(DenseTrainConfig):
    """``conmim detect`` (docs/dense.md): torchvision's Mask R-CNN (or Faster R-CNN) on the pyramid,
    COCO data. Defaults: a CPU-sized run on the built-in scenes; not a published recipe."""

    # Data: each split's COCO instances file and the folder its file_name entries are relative to
    # (COCO 2017: train2017/ + instances_train2017.json, val2017/ + instances_val2017.json); all
    # empty: the built-in scenes (the scenes section).
    train_images: str = ""
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    masks: bool = True  # Mask R-CNN (box and mask AP); false: Faster R-CNN (box AP)
    img_size: int = 64  # backbone resolution: images are resized so their longer side is this
    scales: list[float] = field(default_factory=lambda: [2.0, 1.0, 0.5, 0.25])
    out_channels: int = 64  # per level, ViTDet's 1x1 + 3x3 neck (ViTDet: 256)
    anchor_scale: float = 8.0  # anchor side = anchor_scale * stride per level (torchvision's FPN: 32 at stride 4)
    # Large-scale jitter (ViTDet: [0.1, 2.0]): training images scaled to fit img_size x U(low, high),
    # cropped at random to img_size x img_size and padded to it; []: resized to img_size only.
    scale_range: list[float] = field(default_factory=list)
    batch_size: int = 4
    weight_decay: float = 0.1  # ViTDet's
    layer_decay: float = 0.75
    warmup_ratio: float = 1.0e-3


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linprobe: LinProbeConfig = field(default_factory=LinProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    output_dir: str = "runs/default"
    resume: str = ""
    device: str = "auto"


BENCH_DATA = ("synthetic", "jpeg")


@dataclass
class BenchConfig:
    """``conmim bench`` only: what to feed the step and how long to time it."""

    # synthetic (tensors on the device) | jpeg (generated files) | a folder of images | shards (folder of .tar, pattern)
    data: str = "synthetic"
    steps: int = 20  # timed optimizer steps per path, split into ``repeats`` chunks
    warmup: int = 3  # untimed steps first (compilation, autotuning, worker start-up)
    repeats: int = 3  # the figure is the median chunk; the spread of the chunks is reported too
    jpeg_images: int = 384  # jpeg: how many files to write
    peak_tflops: float = 0.0  # MFU denominator; 0: the device's dense bf16 datasheet peak when known
    # the variant timed beside the configured one: empty = "plain" (eager fp32, for-loop optimizer); else
    # "baseline", the configuration with these dotted overrides, e.g. [train.grad_checkpointing=false]
    baseline: list[str] = field(default_factory=list)


@dataclass
class BenchRunConfig(Config):
    """A training configuration plus the ``bench.*`` settings."""

    bench: BenchConfig = field(default_factory=BenchConfig)


def preset_path(name: str) -> Path:
    """Path of a YAML preset shipped inside the package (``configs/NAME.yaml``)."""
    path = Path(str(resources.files("conmim") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available)}")
    return path


# Keys that earlier versions wrote into run configurations and that no longer exist: dropped when an old
# run's config.yaml or checkpoint is read, so its directory still works with every command.
RETIRED_KEYS = ("train.inject_nan_steps",)


def without_retired(raw: Any) -> Any:
    """An OmegaConf node (or plain dict) of a stored configuration, less the :data:`RETIRED_KEYS`."""
    node = OmegaConf.create(raw) if not OmegaConf.is_config(raw) else raw
    for dotted in RETIRED_KEYS:
        section, key = dotted.rsplit(".", 1)
        parent = OmegaConf.select(node, section)
        if parent is not None and key in parent:
            parent.pop(key)
    return node


def load_config(
    config_file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    default_preset: str | None = None,
    schema_cls: type[Config] = Config,
    check: bool = True,
) -> Config:
    """Merge defaults, then a YAML file (or a packaged preset), then ``key=value`` overrides.

    ``schema_cls`` is :class:`Config` or a subclass with extra sections (``conmim bench``).
    ``check=False`` leaves :func:`validate` to the caller (``conmim stats`` computes ``data.mean`` /
    ``data.std``, so it cannot ask for them to match ``model.in_chans`` first).
    """
    schema = OmegaConf.structured(schema_cls)
    layers: list[Any] = [schema]
    source = config_file or (str(preset_path(default_preset)) if default_preset else None)
    try:
        if source:
            if not os.path.isfile(source):
                source = str(preset_path(source))  # allow a preset name instead of a file
            layers.append(without_retired(OmegaConf.load(source)))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, f"{source or 'defaults'} + overrides")) from None
    if check:
        validate(cfg)
    return cfg


def _fields_under(dotted: str) -> list[str] | None:
    """Field names of the config section at ``dotted`` ('' = top level), or None if it is no section."""
    node: Any = Config()
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part, None)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None


def _explain(err: OmegaConfBaseException, where: str) -> str:
    """OmegaConf's error as one line naming the key, the value and what is allowed."""
    full_key = str(getattr(err, "full_key", "") or "")
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    if isinstance(err, ConfigKeyError) and full_key:
        parent = full_key.rpartition(".")[0]
        allowed = _fields_under(parent)
        listing = f"; allowed keys under {parent or 'the top level'}: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {full_key!r} ({where}){listing}"
    if full_key:
        return f"{full_key}: {msg} ({where})"
    return f"bad configuration ({where}): {msg}"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is not allowed: {allowed}")


def validate(cfg: Config) -> None:
    """Reject meaningless values before any work starts.

    Checks that need the data or the process group (enough images for one batch on every rank,
    a writable output folder) are in :func:`conmim.train.engine.preflight`.
    """
    m, k, d, t = cfg.model, cfg.mask, cfg.data, cfg.train
    _require(m.arch in ARCHS, "model.arch", m.arch, f"one of {', '.join(ARCHS)}")
    _require(m.objective in OBJECTIVES, "model.objective", m.objective, f"one of {', '.join(OBJECTIVES)}")
    _require(m.encoder in ENCODERS, "model.encoder", m.encoder, f"one of {', '.join(ENCODERS)}")
    _require(m.pos_embed in POS_EMBEDS, "model.pos_embed", m.pos_embed, f"one of {', '.join(POS_EMBEDS)}")
    _require(
        m.rel_pos_init in REL_POS_INITS, "model.rel_pos_init", m.rel_pos_init, f"one of {', '.join(REL_POS_INITS)}"
    )
    _require(
        m.encoder == "beit" or (m.pos_embed, m.rel_pos_init) == ("none", "zero"),
        "model.pos_embed/rel_pos_init",
        (m.pos_embed, m.rel_pos_init),
        "none/zero with model.encoder=vit (its absolute position embedding is timm's own)",
    )
    _require(m.depth >= 0, "model.depth", m.depth, "0 (the arch's depth) or a positive integer")
    _require(m.patch_size > 0, "model.patch_size", m.patch_size, "a positive integer")
    _require(
        m.img_size > 0 and m.img_size % m.patch_size == 0,
        "model.img_size",
        m.img_size,
        f"a positive multiple of model.patch_size={m.patch_size}",
    )
    _require(m.temperature > 0, "model.temperature", m.temperature, "a positive number")
    _require(
        m.proj_hidden_dim > 0 and m.proj_out_dim > 0,
        "model.proj_hidden_dim/proj_out_dim",
        (m.proj_hidden_dim, m.proj_out_dim),
        "positive integers",
    )
    _require(0.0 <= m.drop_path < 1.0, "model.drop_path", m.drop_path, "a number in [0, 1)")
    _require(0.0 <= m.teacher_drop_path < 1.0, "model.teacher_drop_path", m.teacher_drop_path, "a number in [0, 1)")
    _require(m.in_chans > 0, "model.in_chans", m.in_chans, "a positive integer")
    _require(not m.init or m.objective == "conmim", "model.init", m.init, "only with model.objective=conmim")
    _require(k.type in MASK_TYPES, "mask.type", k.type, f"one of {', '.join(MASK_TYPES)}")
    _require(0.0 < k.ratio < 1.0, "mask.ratio", k.ratio, "a number strictly between 0 and 1")
    grid = m.img_size // m.patch_size
    if k.type == "random_unit":
        _require(
            k.unit > 0 and grid % k.unit == 0,
            "mask.unit",
            k.unit,
            f"a divisor of the patch grid {grid} (model.img_size={m.img_size} / "
            f"model.patch_size={m.patch_size}), i.e. mask units of unit*patch_size pixels",
        )
    _require(d.source in SOURCES, "data.source", d.source, f"one of {', '.join(SOURCES)}")
    _require(d.on_error in ("skip", "raise"), "data.on_error", d.on_error, "skip or raise")
    _require(0.0 < d.crop_scale_min <= 1.0, "data.crop_scale_min", d.crop_scale_min, "in (0, 1]")
    _require(
        len(d.mean) == m.in_chans and len(d.std) == m.in_chans and all(s > 0 for s in d.std),
        "data.mean/data.std",
        (d.mean, d.std),
        f"{m.in_chans} values each, std positive",
    )
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "0 or more")
    reads_files = d.source in ("folder", "list", "webdataset")
    reads_files = reads_files or (isinstance(cfg, BenchRunConfig) and cfg.bench.data != "synthetic")
    _require(
        not d.gpu_aug or m.in_chans == 3,
        "data.gpu_aug",
        d.gpu_aug,
        f"false with model.in_chans={m.in_chans}; the device data path decodes RGB photos only",
    )
    _require(
        not d.gpu_aug or reads_files,
        "data.gpu_aug",
        d.gpu_aug,
        f"false with data.source={d.source!r}; the device data path reads files (folder, list or webdataset)",
    )
    _require(t.batch_size > 0, "train.batch_size", t.batch_size, "a positive integer")
    _require(t.base_lr > 0, "train.base_lr", t.base_lr, "a positive number")
    _require(t.min_lr >= 0, "train.min_lr", t.min_lr, "0 or more")
    _require(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "0 or more")
    _require(
        t.weight_decay >= 0 and t.weight_decay_end >= 0,
        "train.weight_decay/weight_decay_end",
        (t.weight_decay, t.weight_decay_end),
        "0 or more",
    )
    _require(t.clip_grad >= 0, "train.clip_grad", t.clip_grad, "0 (no clipping) or a positive number")
    _require(t.epochs > 0, "train.epochs", t.epochs, "a positive integer")
    _require(t.max_steps >= 0, "train.max_steps", t.max_steps, "0 (no cap) or a positive integer")
    _require(t.accum_steps > 0, "train.accum_steps", t.accum_steps, "a positive integer")
    _require(t.checkpoint_every > 0, "train.checkpoint_every", t.checkpoint_every, "a positive integer")
    _require(t.log_every > 0, "train.log_every", t.log_every, "a positive integer")
    _require(t.keep_checkpoints > 0, "train.keep_checkpoints", t.keep_checkpoints, "a positive integer")
    _require(
        t.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision", t.precision, "auto, bf16, fp16 or fp32"
    )
    _require(
        0.0 <= t.momentum <= 1.0 and 0.0 <= t.momentum_end <= 1.0,
        "train.momentum",
        (t.momentum, t.momentum_end),
        "values in [0, 1]",
    )
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas, "two numbers in [0, 1)")
    _require(t.nan_policy in NAN_POLICIES, "train.nan_policy", t.nan_policy, f"one of {', '.join(NAN_POLICIES)}")
    _require(t.max_bad_steps > 0, "train.max_bad_steps", t.max_bad_steps, "a positive integer")
    _require(0.0 < t.nan_lr_factor < 1.0, "train.nan_lr_factor", t.nan_lr_factor, "a number strictly between 0 and 1")
    _require(t.nan_max_restores >= 0, "train.nan_max_restores", t.nan_max_restores, "0 or more")
    _require(t.dist_timeout_s > 0, "train.dist_timeout_s", t.dist_timeout_s, "a positive number of seconds")
    _require(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, "device", cfg.device, "auto, cpu, cuda or cuda:N"
    )
    _require(bool(cfg.output_dir.strip()), "output_dir", cfg.output_dir, "a folder path")
    _require(
        cfg.eval.knn_k > 0 and cfg.eval.knn_t > 0 and cfg.eval.batch_size > 0,
        "eval.knn_k/knn_t/batch_size",
        (cfg.eval.knn_k, cfg.eval.knn_t, cfg.eval.batch_size),
        "positive numbers",
    )
    _validate_eval(cfg)
    _validate_segment(cfg.segment)
    _validate_detect(cfg.detect)
    sc = cfg.scenes
    _require(
        sc.train > 0 and sc.val > 0 and sc.size >= 16,
        "scenes.train/val/size",
        (sc.train, sc.val, sc.size),
        "positive counts and a size of 16 px or more",
    )
    if isinstance(cfg, BenchRunConfig):
        b = cfg.bench
        _require(
            b.data in BENCH_DATA or os.path.isdir(b.data) or b.data.endswith(".tar"),
            "bench.data",
            b.data,
            "synthetic, jpeg, an existing folder of images or of .tar shards, or a shard file or pattern (.tar)",
        )
        _require(
            b.repeats > 0 and b.steps >= b.repeats,
            "bench.steps/bench.repeats",
            (b.steps, b.repeats),
            "repeats >= 1 and steps >= repeats",
        )
        _require(b.warmup >= 1, "bench.warmup", b.warmup, "1 or more (the first step compiles and allocates)")
        _require(
            b.jpeg_images >= t.batch_size,
            "bench.jpeg_images",
            b.jpeg_images,
            f"at least train.batch_size={t.batch_size}",
        )
        _require(b.peak_tflops >= 0, "bench.peak_tflops", b.peak_tflops, "0 (look up) or a positive number")


def _validate_eval(cfg: Config) -> None:
    e, lp, ft = cfg.eval, cfg.linprobe, cfg.finetune
    _require(e.pool in ("cls", "mean"), "eval.pool", e.pool, "cls or mean")
    _require(
        e.train_limit >= 0 and e.test_limit >= 0,
        "eval.train_limit/test_limit",
        (e.train_limit, e.test_limit),
        "0 (all images) or a positive count",
    )
    _require(e.which in ("teacher", "student"), "eval.which", e.which, "teacher or student")
    _require(e.knn_k > 0 and e.knn_t > 0, "eval.knn_k/knn_t", (e.knn_k, e.knn_t), "positive numbers")
    _require(e.monitor_every >= 0, "eval.monitor_every", e.monitor_every, "0 (off) or a positive step count")
    _require(
        e.monitor_bank > 0 and e.monitor_queries > 0,
        "eval.monitor_bank/monitor_queries",
        (e.monitor_bank, e.monitor_queries),
        "positive integers",
    )
    _require(lp.pool in ("cls", "mean"), "linprobe.pool", lp.pool, "cls or mean")
    _require(lp.optimizer in ("sgd", "lars"), "linprobe.optimizer", lp.optimizer, "sgd or lars")
    _require(
        lp.epochs > 0 and lp.batch_size > 0,
        "linprobe.epochs/batch_size",
        (lp.epochs, lp.batch_size),
        "positive integers",
    )
    _require(ft.img_size >= 0, "finetune.img_size", ft.img_size, "0 (pre-training size) or a positive size")
    _require(
        ft.epochs > 0 and ft.batch_size > 0,
        "finetune.epochs/batch_size",
        (ft.epochs, ft.batch_size),
        "positive integers",
    )
    _require(ft.init in ENCODER_INITS, "finetune.init", ft.init, " or ".join(ENCODER_INITS))
    _require(0.0 < ft.layer_decay <= 1.0, "finetune.layer_decay", ft.layer_decay, "a number in (0, 1]")
    _require(0.0 <= ft.drop_path < 1.0, "finetune.drop_path", ft.drop_path, "a number in [0, 1)")
    _require(0.0 <= ft.label_smoothing < 1.0, "finetune.label_smoothing", ft.label_smoothing, "in [0, 1)")
    _require(0.0 < ft.crop_scale_min <= 1.0, "finetune.crop_scale_min", ft.crop_scale_min, "in (0, 1]")
    _require(ft.color_jitter >= 0.0, "finetune.color_jitter", ft.color_jitter, "0 (none) or a positive strength")
    _require(0.0 < ft.crop_pct <= 1.0, "finetune.crop_pct", ft.crop_pct, "in (0, 1]")
    _require(
        ft.mixup == 0 and ft.cutmix == 0 or ft.batch_size % 2 == 0,
        "finetune.batch_size",
        ft.batch_size,
        "an even number when mixup/cutmix is on (timm mixes a batch with its reverse)",
    )


def _validate_dense(name: str, s: DenseTrainConfig) -> None:
    """The shared fields of ``segment`` or ``detect`` (``name``)."""
    _require(s.init in ENCODER_INITS, f"{name}.init", s.init, " or ".join(ENCODER_INITS))
    _require(
        len(s.scales) >= 2 and all(x > 0 and math.log2(x).is_integer() for x in s.scales),
        f"{name}.scales",
        s.scales,
        "two or more powers of 2 relative to the token grid, e.g. [4, 2, 1, 0.5]",
    )
    _require(not s.indices or len(s.indices) == len(s.scales), f"{name}.indices", s.indices, "[] or one per scale")
    _require(0 <= s.drop_path < 1, f"{name}.drop_path", s.drop_path, "in [0, 1)")
    for key in ("iters", "batch_size", "log_every", "checkpoint_every"):
        _require(getattr(s, key) > 0, f"{name}.{key}", getattr(s, key), "a positive integer")
    _require(s.lr > 0 and s.min_lr >= 0, f"{name}.lr/min_lr", (s.lr, s.min_lr), "lr positive, min_lr 0 or more")
    _require(0 < s.layer_decay <= 1, f"{name}.layer_decay", s.layer_decay, "a number in (0, 1]")
    _require(len(s.betas) == 2 and all(0 <= b < 1 for b in s.betas), f"{name}.betas", s.betas, "two numbers in [0, 1)")
    _require(
        s.warmup_iters >= 0 and 0 < s.warmup_ratio <= 1,
        f"{name}.warmup_iters/warmup_ratio",
        (s.warmup_iters, s.warmup_ratio),
        "warm-up iterations 0 or more, ratio in (0, 1]",
    )
    _require(
        s.eval_every >= 0 and s.val_limit >= 0, f"{name}.eval_every/val_limit", (s.eval_every, s.val_limit), "0 or more"
    )


def _validate_segment(s: SegmentConfig) -> None:
    _validate_dense("segment", s)
    _require(s.head in SEGMENT_HEADS, "segment.head", s.head, f"one of {', '.join(SEGMENT_HEADS)}")
    pair = (s.images, s.masks, s.val_images, s.val_masks)
    _require(
        all(pair) or not any(pair),
        "segment.images/masks/val_images/val_masks",
        pair,
        "all four folders (a generic image + mask pair for training and validation) or none",
    )
    _require(not (s.data and any(pair)), "segment.data", s.data, "empty when segment.images/masks/... name the folders")
    _require(
        s.num_classes > 0 or not (s.data or any(pair)),
        "segment.num_classes",
        s.num_classes,
        "the number of classes of your masks (ids 1..N, 0 = ignore; ADE20K: 150)",
    )
    _require(0 <= s.num_classes < 255, "segment.num_classes", s.num_classes, "0..254")
    _require(s.channels > 0, "segment.channels", s.channels, "a positive integer")
    _require(0 <= s.dropout < 1, "segment.dropout", s.dropout, "in [0, 1)")
    _require(s.aux_weight >= 0, "segment.aux_weight", s.aux_weight, "0 (no auxiliary head) or a positive loss weight")
    _require(s.crop_size > 0, "segment.crop_size", s.crop_size, "a positive size, a multiple of the patch size")
    _require(s.base_size >= 0, "segment.base_size", s.base_size, "0 (as they are) or a positive size")
    _require(
        len(s.ratio_range) == 2 and 0 < s.ratio_range[0] <= s.ratio_range[1],
        "segment.ratio_range",
        s.ratio_range,
        "[low, high] with 0 < low <= high",
    )
    _require(s.eval_stride >= 0, "segment.eval_stride", s.eval_stride, "0 (2/3 of the crop) or a positive stride")


def _validate_detect(d: DetectConfig) -> None:
    _validate_dense("detect", d)
    files = (d.train_images, d.train_ann, d.val_images, d.val_ann)
    _require(
        all(files) or not any(files),
        "detect.train_images/train_ann/val_images/val_ann",
        files,
        "all four (each split's image folder and COCO instances file) or none (the built-in scenes)",
    )
    _require(
        d.img_size > 0 and d.out_channels > 0 and d.anchor_scale > 0,
        "detect.img_size/out_channels/anchor_scale",
        (d.img_size, d.out_channels, d.anchor_scale),
        "positive numbers",
    )
    _require(
        not d.scale_range or (len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1]),
        "detect.scale_range",
        d.scale_range,
        "[] (no jitter) or [low, high] with 0 < low <= high, e.g. ViTDet's [0.1, 2.0]",
    )
