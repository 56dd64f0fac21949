"""conmim: ConMIM (Masked Image Modeling with Denoising Contrast, ICLR 2023) pre-training for ViTs."""

from .config import Config, load_config
from .data.masking import MaskGenerator
from .data.views import PairedViews
from .export.encoders import load_encoder
from .models.conmim import ConMIM, denoising_contrastive_loss, timm_spec
from .train.engine import pretrain
from .train.schedules import teacher_momentum

__all__ = [
    "ConMIM",
    "Config",
    "MaskGenerator",
    "PairedViews",
    "denoising_contrastive_loss",
    "load_config",
    "load_encoder",
    "pretrain",
    "teacher_momentum",
    "timm_spec",
]
__version__ = "0.1.0"
