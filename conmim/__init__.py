"""conmim: ConMIM (Masked Image Modeling with Denoising Contrast, ICLR 2023) pre-training for ViTs."""

from .config import Config, load_config
from .export import load_encoder
from .masking import MaskGenerator
from .model import ConMIM, denoising_contrastive_loss, timm_spec

__all__ = [
    "ConMIM",
    "Config",
    "MaskGenerator",
    "denoising_contrastive_loss",
    "load_config",
    "load_encoder",
    "timm_spec",
]
__version__ = "0.1.0"
