"""Checks of values that are well typed but meaningless, one function per section.

OmegaConf already rejects unknown keys and wrong types; these name the field, the value and what is
allowed, before any work starts. A command runs the checks of the sections it reads
(:data:`conmim.config.commands.COMMAND_KEYS`). Checks that need the data or the process group
(enough images for one batch on every rank, a writable output folder) are in
:func:`conmim.train.setup.preflight`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

from .sections import (
    ARCHS,
    BENCH_DATA,
    ENCODER_INITS,
    ENCODERS,
    MASK_TYPES,
    NAN_POLICIES,
    OBJECTIVES,
    POS_EMBEDS,
    REL_POS_INITS,
    SEGMENT_HEADS,
    SOURCES,
    Config,
    ConfigError,
    DenseTrainConfig,
)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")
WHICH = ("teacher", "student")


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is not allowed: {allowed}")


def _one_of(value: Any, field_name: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, field_name, value, f"one of {', '.join(allowed)}")


def check_run(cfg: Config) -> None:
    """The top level: what every command shares."""
    _one_of(cfg.precision, "precision", PRECISIONS)
    _require(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, "device", cfg.device, "auto, cpu, cuda or cuda:N"
    )
    _require(bool(cfg.output_dir.strip()), "output_dir", cfg.output_dir, "a folder path")
    _require(cfg.dist_timeout_s > 0, "dist_timeout_s", cfg.dist_timeout_s, "a positive number of seconds")
    _require(
        all(name in STOP_SIGNALS for name in cfg.stop_signals),
        "stop_signals",
        cfg.stop_signals,
        f"a list of {', '.join(STOP_SIGNALS)}",
    )


def check_model(cfg: Config) -> None:
    m = cfg.model
    _one_of(m.arch, "model.arch", ARCHS)
    _one_of(m.objective, "model.objective", OBJECTIVES)
    _one_of(m.encoder, "model.encoder", ENCODERS)
    _one_of(m.pos_embed, "model.pos_embed", POS_EMBEDS)
    _one_of(m.rel_pos_init, "model.rel_pos_init", REL_POS_INITS)
    _require(
        m.encoder == "beit" or (m.pos_embed, m.rel_pos_init) == ("none", "zero"),
        "model.pos_embed/rel_pos_init",
        (m.pos_embed, m.rel_pos_init),
        "none/zero with model.encoder=vit (its absolute position embedding is timm's own)",
    )
    _require(m.depth >= 0, "model.depth", m.depth, "0 (the arch's depth) or a positive integer")
    check_shape(cfg)
    _require(m.temperature > 0, "model.temperature", m.temperature, "a positive number")
    _require(
        m.proj_hidden_dim > 0 and m.proj_out_dim > 0,
        "model.proj_hidden_dim/proj_out_dim",
        (m.proj_hidden_dim, m.proj_out_dim),
        "positive integers",
    )
    _require(0.0 <= m.drop_path < 1.0, "model.drop_path", m.drop_path, "a number in [0, 1)")
    _require(0.0 <= m.teacher_drop_path < 1.0, "model.teacher_drop_path", m.teacher_drop_path, "a number in [0, 1)")
    _require(not m.init or m.objective == "conmim", "model.init", m.init, "only with model.objective=conmim")
    if m.objective == "mae":
        check_mae_decoder(cfg)


def check_mae_decoder(cfg: Config) -> None:
    """``model.objective=mae``: timm's ViT as the encoder (its absolute position embedding is the MAE
    encoder's fixed sin-cos one, and exports stay plain timm ViTs), and a decoder that can be built."""
    m = cfg.model
    _require(
        m.encoder == "vit",
        "model.encoder",
        m.encoder,
        "vit with model.objective=mae (an encoder that sees only the visible patches needs an absolute "
        "position embedding: add model.encoder=vit model.pos_embed=none model.rel_pos_init=zero)",
    )
    dims = (m.decoder_depth, m.decoder_dim, m.decoder_heads)
    _require(
        min(dims) > 0 and m.decoder_dim % 4 == 0 and m.decoder_dim % m.decoder_heads == 0,
        "model.decoder_depth/decoder_dim/decoder_heads",
        dims,
        "positive integers, decoder_dim a multiple of 4 (2-D sin-cos positions) and of decoder_heads",
    )


def masked_count(cfg: Config) -> int | None:
    """The number of masked patches every mask of ``cfg.mask`` has, or None when it varies (block)."""
    m, k = cfg.model, cfg.mask
    grid = m.img_size // m.patch_size
    if k.type == "random":
        return int(round(k.ratio * grid * grid))
    if k.type == "random_unit" and k.unit > 0 and grid % k.unit == 0:
        return math.ceil((grid // k.unit) ** 2 * k.ratio) * k.unit * k.unit
    return None


def check_shape(cfg: Config) -> None:
    """The model fields that the evaluation commands read too: image size, patch size, channels."""
    m = cfg.model
    _require(m.patch_size > 0, "model.patch_size", m.patch_size, "a positive integer")
    _require(
        m.img_size > 0 and m.img_size % m.patch_size == 0,
        "model.img_size",
        m.img_size,
        f"a positive multiple of model.patch_size={m.patch_size}",
    )
    _require(m.in_chans > 0, "model.in_chans", m.in_chans, "a positive integer")


def check_mask(cfg: Config) -> None:
    m, k = cfg.model, cfg.mask
    _one_of(k.type, "mask.type", MASK_TYPES)
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
    if m.objective == "mae":  # the encoder stacks the visible tokens: one count for every image
        count = masked_count(cfg)
        _require(
            count is not None,
            "mask.type",
            k.type,
            "random or random_unit with model.objective=mae (every image needs the same number of masked "
            "patches; block masks vary)",
        )
        _require(
            0 < count < grid * grid,  # type: ignore[operator]
            "mask.ratio",
            k.ratio,
            f"a ratio that masks some but not all of the {grid * grid} patches with model.objective=mae "
            f"(mask.type={k.type} masks {count})",
        )


def check_data(cfg: Config) -> None:
    d, chans = cfg.data, cfg.model.in_chans
    _one_of(d.source, "data.source", SOURCES)
    _require(d.on_error in ("skip", "raise"), "data.on_error", d.on_error, "skip or raise")
    _require(0.0 < d.crop_scale_min <= 1.0, "data.crop_scale_min", d.crop_scale_min, "in (0, 1]")
    _require(
        len(d.mean) == chans and len(d.std) == chans and all(s > 0 for s in d.std),
        "data.mean/data.std",
        (d.mean, d.std),
        f"{chans} values each (model.in_chans={chans}), std positive; `conmim stats` measures them",
    )
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "0 or more")
    _require(
        d.train_limit >= 0 and d.test_limit >= 0,
        "data.train_limit/test_limit",
        (d.train_limit, d.test_limit),
        "0 (all images) or a positive count",
    )
    _require(
        d.source != "scenes" or chans == 3,
        "model.in_chans",
        chans,
        "3 with data.source=scenes (the scenes are RGB)",
    )
    _require(
        not d.gpu_aug or chans == 3,
        "data.gpu_aug",
        d.gpu_aug,
        f"false with model.in_chans={chans}; the device data path decodes RGB photos only",
    )


def check_data_files(cfg: Config) -> None:
    """``data.gpu_aug`` reads encoded files or images held in memory (``bench`` brings its own)."""
    d = cfg.data
    _require(
        not d.gpu_aug or d.source in ("folder", "list", "webdataset", "scenes", "fashion_mnist"),
        "data.gpu_aug",
        d.gpu_aug,
        f"false with data.source={d.source!r}; the device data path reads files (folder, list, webdataset, "
        "scenes) or images in memory (fashion_mnist)",
    )


def check_train(cfg: Config) -> None:
    t = cfg.train
    for key in ("batch_size", "epochs", "accum_steps", "checkpoint_every", "log_every", "keep_checkpoints"):
        _require(getattr(t, key) > 0, f"train.{key}", getattr(t, key), "a positive integer")
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
    _require(t.max_steps >= 0, "train.max_steps", t.max_steps, "0 (no cap) or a positive integer")
    _require(
        0.0 <= t.momentum <= 1.0 and 0.0 <= t.momentum_end <= 1.0,
        "train.momentum",
        (t.momentum, t.momentum_end),
        "values in [0, 1]",
    )
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas, "two numbers in [0, 1)")
    _one_of(t.nan_policy, "train.nan_policy", NAN_POLICIES)
    _require(t.max_bad_steps > 0, "train.max_bad_steps", t.max_bad_steps, "a positive integer")
    _require(0.0 < t.nan_lr_factor < 1.0, "train.nan_lr_factor", t.nan_lr_factor, "a number strictly between 0 and 1")
    _require(t.nan_max_restores >= 0, "train.nan_max_restores", t.nan_max_restores, "0 or more")


def check_eval(cfg: Config) -> None:
    e = cfg.eval
    _require(
        e.knn_k > 0 and e.knn_t > 0 and e.batch_size > 0,
        "eval.knn_k/knn_t/batch_size",
        (e.knn_k, e.knn_t, e.batch_size),
        "positive numbers",
    )
    _require(e.pool in ("cls", "mean"), "eval.pool", e.pool, "cls or mean")
    _one_of(e.which, "eval.which", WHICH)
    _require(e.monitor_every >= 0, "eval.monitor_every", e.monitor_every, "0 (off) or a positive step count")
    _require(
        e.monitor_bank > 0 and e.monitor_queries > 0,
        "eval.monitor_bank/monitor_queries",
        (e.monitor_bank, e.monitor_queries),
        "positive integers",
    )


def check_linprobe(cfg: Config) -> None:
    lp = cfg.linprobe
    _require(lp.pool in ("cls", "mean"), "linprobe.pool", lp.pool, "cls or mean")
    _require(lp.optimizer in ("sgd", "lars"), "linprobe.optimizer", lp.optimizer, "sgd or lars")
    _require(
        lp.epochs > 0 and lp.batch_size > 0,
        "linprobe.epochs/batch_size",
        (lp.epochs, lp.batch_size),
        "positive integers",
    )


def check_finetune(cfg: Config) -> None:
    ft = cfg.finetune
    _require(ft.img_size >= 0, "finetune.img_size", ft.img_size, "0 (pre-training size) or a positive size")
    _require(
        min(ft.epochs, ft.batch_size, ft.log_every, ft.checkpoint_every, ft.max_bad_steps) > 0,
        "finetune.epochs/batch_size/log_every/checkpoint_every/max_bad_steps",
        (ft.epochs, ft.batch_size, ft.log_every, ft.checkpoint_every, ft.max_bad_steps),
        "positive integers",
    )
    _require(ft.init in ENCODER_INITS, "finetune.init", ft.init, " or ".join(ENCODER_INITS))
    _one_of(ft.which, "finetune.which", WHICH)
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


def _check_dense(name: str, s: DenseTrainConfig) -> None:
    """The shared fields of ``segment`` or ``detect`` (``name``)."""
    _require(s.init in ENCODER_INITS, f"{name}.init", s.init, " or ".join(ENCODER_INITS))
    _one_of(s.which, f"{name}.which", WHICH)
    _require(
        len(s.scales) >= 2 and all(x > 0 and math.log2(x).is_integer() for x in s.scales),
        f"{name}.scales",
        s.scales,
        "two or more powers of 2 relative to the token grid, e.g. [4, 2, 1, 0.5]",
    )
    _require(not s.indices or len(s.indices) == len(s.scales), f"{name}.indices", s.indices, "[] or one per scale")
    _require(0 <= s.drop_path < 1, f"{name}.drop_path", s.drop_path, "in [0, 1)")
    for key in ("iters", "batch_size", "log_every", "checkpoint_every", "max_bad_steps"):
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


def check_segment(cfg: Config) -> None:
    s = cfg.segment
    _check_dense("segment", s)
    _one_of(s.head, "segment.head", SEGMENT_HEADS)
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


def check_detect(cfg: Config) -> None:
    d = cfg.detect
    _check_dense("detect", d)
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


def check_scenes(cfg: Config) -> None:
    sc = cfg.scenes
    _require(
        sc.train > 0 and sc.val > 0 and sc.size >= 16,
        "scenes.train/val/size",
        (sc.train, sc.val, sc.size),
        "positive counts and a size of 16 px or more",
    )


def check_bench(cfg: Config) -> None:
    b, t = cfg.bench, cfg.train  # type: ignore[attr-defined]
    _require(
        b.data in BENCH_DATA or os.path.isdir(b.data) or b.data.endswith(".tar"),
        "bench.data",
        b.data,
        "synthetic, jpeg, an existing folder of images or of .tar shards, or a shard file or pattern (.tar)",
    )
    _require(
        not cfg.data.gpu_aug or b.data != "synthetic",
        "data.gpu_aug",
        cfg.data.gpu_aug,
        "false with bench.data=synthetic; the device data path reads files (bench.data=jpeg, a folder or shards)",
    )
    _require(b.repeats > 0 and b.steps >= b.repeats, "bench.steps/bench.repeats", (b.steps, b.repeats), "repeats >= 1")
    _require(b.warmup >= 1, "bench.warmup", b.warmup, "1 or more (the first step compiles and allocates)")
    _require(
        b.jpeg_images >= t.batch_size, "bench.jpeg_images", b.jpeg_images, f"at least train.batch_size={t.batch_size}"
    )
    _require(b.peak_tflops >= 0, "bench.peak_tflops", b.peak_tflops, "0 (look up) or a positive number")


Check = Callable[[Config], None]
# Each command's checks, in order (the sections it reads: conmim.config.commands.COMMAND_KEYS).
_PRETRAIN: tuple[Check, ...] = (check_run, check_model, check_mask, check_data, check_train, check_eval, check_linprobe)
COMMAND_CHECKS: dict[str, tuple[Check, ...]] = {
    "pretrain": (*_PRETRAIN, check_data_files, check_scenes),
    "bench": (*_PRETRAIN, check_bench),
    "knn": (check_run, check_shape, check_data, check_eval),
    "linprobe": (check_run, check_shape, check_data, check_eval, check_linprobe),
    "finetune": (check_run, check_shape, check_data, check_finetune),
    "segment": (check_run, check_data, check_scenes, check_segment),
    "detect": (check_run, check_data, check_scenes, check_detect),
    "stats": (check_run, check_shape, check_data),
}
ALL_CHECKS: tuple[Check, ...] = (*_PRETRAIN, check_finetune, check_segment, check_detect, check_scenes)


def validate(cfg: Config, command: str | None = None) -> None:
    """Run ``command``'s checks (every section's when None: a configuration used by several commands)."""
    if command is None:
        checks = (*ALL_CHECKS, check_bench if hasattr(cfg, "bench") else check_data_files)
    else:
        checks = COMMAND_CHECKS[command]
    for check in checks:
        check(cfg)
