"""The networks: ConMIM (student, teacher, projectors, loss, EMA) and the two pixel-regression baselines."""

from typing import Any

from .conmim import ConMIM
from .mae import MAE
from .pixel_mim import PixelMIM

PretrainingModel = ConMIM | PixelMIM | MAE
_BASELINES: dict[str, type[PixelMIM] | type[MAE]] = {"pixel": PixelMIM, "mae": MAE}


def pretraining_model(m: Any) -> PretrainingModel:
    """The pre-training model a :class:`conmim.config.ModelConfig` names with ``objective``."""
    return _BASELINES.get(m.objective, ConMIM).from_config(m)
