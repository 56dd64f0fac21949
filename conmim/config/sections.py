"""The sections of the configuration: one dataclass each, defaults documented beside the fields."""

from __future__ import annotations

from dataclasses import dataclass, field

ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")
NAN_POLICIES = ("restore", "stop")
ENCODERS = ("beit", "vit")
POS_EMBEDS = ("none", "mask_sincos", "sincos", "sincos_fixed")
REL_POS_INITS = ("zero", "locality")
ENCODER_INITS = ("pretrained", "random")  # random: timm's initialisation of the same architecture (scratch)
OBJECTIVES = ("conmim", "pixel", "mae")
MASK_TYPES = ("random_unit", "block", "random")
SOURCES = ("fashion_mnist", "folder", "list", "webdataset", "synthetic", "scenes")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and what is allowed."""


@dataclass
class ModelConfig:
    # conmim: denoising contrast; pixel: SimMIM-style baseline (mask tokens in the encoder, conmim.models.pixel_mim);
    # mae: MAE-style baseline (encoder sees the visible patches only, light decoder; conmim.models.mae)
    objective: str = "conmim"
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
    # objective=mae only (the others ignore them): the light decoder, sized for small encoders (MAE's
    # ViT-B/L used 8 blocks of width 512); decoder_dim a multiple of 4 (sin-cos) and of decoder_heads
    decoder_depth: int = 2
    decoder_dim: int = 128
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # target: each patch's pixels normalised by its own mean/variance (false: as given)


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
    # split "." means data.path itself, and so does a training split that data.path lacks (a flat folder or
    # one of class folders: conmim.data.splits.split_location, used by every command).
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
    train_limit: int = 0  # knn / linprobe / finetune: images of data.split used, drawn with the seed (0: all)
    test_limit: int = 0  # ... and of data.eval_split (0: all)


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
    compile: bool = False
    decay_mask_token: bool = True  # official quirk: weight decay on the mask token
    decay_rel_pos: bool = True  # official quirk: weight decay on the relative position table
    log_every: int = 20
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    # Non-finite loss or gradients: the step is skipped (optimizer and teacher untouched); after
    # max_bad_steps consecutive skipped steps, restore the last checkpoint from before them with the
    # lr multiplied by nan_lr_factor (at most nan_max_restores times), or stop (nan_policy=stop).
    nan_policy: str = "restore"
    max_bad_steps: int = 20
    nan_lr_factor: float = 0.5
    nan_max_restores: int = 3


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_t: float = 0.07
    pool: str = "mean"  # mean (patch tokens, what ConMIM trains) | cls (never in the loss); docs/evaluation.md
    batch_size: int = 256
    which: str = "teacher"  # encoder of a conmim checkpoint for knn / linprobe (the authors': teacher)
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
    # (seeded by the top-level seed), the from-scratch baseline under the same recipe
    init: str = "pretrained"
    which: str = "teacher"  # encoder of a conmim run or checkpoint: teacher (the authors') or student
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
    # steps between checkpoints (also at every epoch end): a killed or preempted run resumes from the
    # last one and ends exactly as an uninterrupted run would
    checkpoint_every: int = 500
    # a non-finite step (NaN/Inf gradient) is skipped; this many in a row stop the run with an error
    max_bad_steps: int = 20


SEGMENT_HEADS = ("upernet", "linear")


@dataclass
class ScenesConfig:
    """The built-in dense data (``conmim/data/scenes.py``), used by ``conmim segment`` and ``conmim
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
    which: str = "teacher"  # encoder of a conmim run or checkpoint: teacher (the authors') or student
    indices: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    drop_path: float = 0.1
    # Rescale a pre-trained encoder's residual stream to a fresh patch embedding's size, as
    # finetune.fresh_scale (ConMIM's teacher keeps the official init's small weights; docs/dense.md).
    fresh_scale: bool = False
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
    # a non-finite step (NaN/Inf gradient) is skipped; this many in a row stop the run with an error
    max_bad_steps: int = 20


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
class RunConfig:
    """What every command shares, at the top level of its configuration."""

    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU and on CPUs with AVX512-BF16/AMX, else fp32) | bf16 | fp16 | fp32
    output_dir: str = "runs/default"
    dist_timeout_s: float = 600.0  # a collective waiting longer than this (dead or hung rank) fails
    # training commands: on these signals finish the step, checkpoint, exit 75 (docs/reliability.md)
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class Config(RunConfig):
    """Every section; each command reads its own (:data:`conmim.config.commands.COMMAND_KEYS`)."""

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
    resume: str = ""  # pretrain: a checkpoint to resume from ("" = the newest in output_dir/checkpoints)


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
