"""Encoders out and in: timm-loadable exports, loading from any source, converting the authors' checkpoints."""

from .encoders import export, load_encoder

__all__ = ["export", "load_encoder"]
