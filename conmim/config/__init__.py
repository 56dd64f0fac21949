"""Typed configuration of every ``conmim`` command.

One dataclass per section (:mod:`.sections`); the top level holds what every command shares (seed,
device, precision, output_dir, dist_timeout_s); each command reads its own sections
(:data:`.commands.COMMAND_KEYS`), checked by :func:`.checks.validate`. YAML presets and dotted
``key=value`` overrides merge through OmegaConf (:func:`.loading.load_config`).
"""

from .checks import validate
from .commands import COMMAND_KEYS, RUN_KEYS
from .loading import RENAMED_KEYS, RETIRED_KEYS, load_config, preset_path, to_yaml, without_retired
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
    BenchConfig,
    BenchRunConfig,
    Config,
    ConfigError,
    DataConfig,
    DenseTrainConfig,
    DetectConfig,
    EvalConfig,
    FinetuneConfig,
    LinProbeConfig,
    MaskConfig,
    ModelConfig,
    RunConfig,
    ScenesConfig,
    SegmentConfig,
    TrainConfig,
)

__all__ = [
    "ARCHS",
    "BENCH_DATA",
    "BenchConfig",
    "BenchRunConfig",
    "COMMAND_KEYS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DenseTrainConfig",
    "DetectConfig",
    "ENCODERS",
    "ENCODER_INITS",
    "EvalConfig",
    "FinetuneConfig",
    "LinProbeConfig",
    "MASK_TYPES",
    "MaskConfig",
    "ModelConfig",
    "NAN_POLICIES",
    "OBJECTIVES",
    "POS_EMBEDS",
    "REL_POS_INITS",
    "RENAMED_KEYS",
    "RETIRED_KEYS",
    "RUN_KEYS",
    "RunConfig",
    "SEGMENT_HEADS",
    "SOURCES",
    "ScenesConfig",
    "SegmentConfig",
    "TrainConfig",
    "load_config",
    "preset_path",
    "to_yaml",
    "validate",
    "without_retired",
]
