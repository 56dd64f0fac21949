"""``conmim export --format onnx``: the encoder as an ONNX graph with a dynamic batch axis, checked
in onnxruntime against PyTorch before the file is handed out.

The graph returns what conmim's own evaluation uses, so a deployment sees the same features:
``tokens`` (B, prefix + patches, D) after the final norm, i.e. ``forward_features``, and
``features`` (B, D), the mean patch token (``eval.pool=mean``, the tokens ConMIM's loss trains).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .encoders import build_encoder

INPUT_NAME = "images"
OUTPUT_NAMES = ("tokens", "features")
EXTRA_HINT = "install the ONNX extra: pip install 'conmim[onnx]' (onnx, onnxruntime, onnxscript)"


class ExportError(RuntimeError):
    """An export could not be written or did not reproduce the PyTorch model."""


class TokensAndFeatures(nn.Module):
    """The exported computation: final-norm tokens and their mean patch token."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encoder.forward_features(images)
        return tokens, tokens[:, self.encoder.num_prefix_tokens :].mean(1)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExportError(f"--format onnx needs the '{module}' package: {EXTRA_HINT}") from err


def input_shape(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of the encoder's input: the graph fixes all but the batch axis."""
    kwargs = spec["kwargs"]
    size = kwargs["img_size"]
    height, width = (size, size) if isinstance(size, int) else size
    return int(kwargs.get("in_chans", 3)), int(height), int(width)


def max_abs_diff(path: str | Path, module: nn.Module, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's outputs for ``path`` and ``module``'s."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        want = module(images)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))


def export_onnx(
    weights: dict[str, torch.Tensor], spec: dict[str, Any], out: str | Path, atol: float = 1e-4, seed: int = 0
) -> tuple[Path, float]:
    """Write ``out`` (.onnx, opset of torch's exporter) and check it: random inputs at batch 1 and 3
    (not the batch it was traced with, so the dynamic axis is exercised) through onnxruntime and
    PyTorch must agree within ``atol``. Returns the path and the measured maximum difference; a
    file that fails the check is removed and :class:`ExportError` names the difference."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        _require(module)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = TokensAndFeatures(build_encoder(weights, spec)).eval()
    shape = input_shape(spec)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *shape, generator=generator)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(out),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=False,
        )
    diff = max(max_abs_diff(out, model, torch.randn(b, *shape, generator=generator)) for b in (1, 3))
    if not diff <= atol:  # also catches NaN
        out.unlink()
        raise ExportError(
            f"{out}: onnxruntime's outputs differ from PyTorch's by up to {diff:.3g}, above the tolerance "
            f"--atol {atol:g}; the file was removed"
        )
    return out, diff
