"""The networks: ConMIM (student, teacher, projectors, loss, EMA) and the pixel-regression baseline."""

from typing import Any

from .conmim import ConMIM
from .pixel_mim import PixelMIM


def pretraining_model(m: Any) -> ConMIM | PixelMIM:
    """The pre-training model a :class:`conmim.config.ModelConfig` names with ``objective``."""
    return (PixelMIM if m.objective == "pixel" else ConMIM).from_config(m)
