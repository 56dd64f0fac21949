"""Export a pre-trained encoder in timm's layout (safetensors + a JSON of timm arguments)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import Config, ConfigError, without_retired
from ..models.conmim import encoder_spec
from ..runtime import checkpoint as ckpt


def load_run_checkpoint(path: str | Path) -> tuple[dict, Path]:
    """A checkpoint from a run directory (its newest readable one) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = ckpt.load_latest(folder)
        if found is None:
            raise FileNotFoundError(f"{path}: no readable checkpoint (looked in {folder})")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such run directory or checkpoint file")
    return ckpt.safe_load(path), path


def config_of(state: dict) -> Config:
    """The run configuration stored inside a checkpoint."""
    if "config" not in state:
        raise ConfigError("checkpoint holds no 'config'; it was not written by conmim pretrain")
    merged = OmegaConf.merge(OmegaConf.structured(Config), without_retired(state["config"]))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def spec_of(cfg: Config) -> dict[str, Any]:
    """The timm spec of a run's exported encoder."""
    return encoder_spec(cfg.model)


def encoder_state(state: dict, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The ``teacher`` or ``student`` encoder weights of a conmim checkpoint, in timm's names."""
    if which not in ("teacher", "student"):
        raise ValueError(f"--which={which!r}: choose teacher or student")
    prefix = f"{which}.encoder."
    weights = {k[len(prefix) :]: v.contiguous() for k, v in state["model"].items() if k.startswith(prefix)}
    if not weights:
        raise KeyError(f"checkpoint has no {prefix}* weights")
    return weights


def write_encoder(weights: dict[str, torch.Tensor], spec: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (.safetensors) and the timm arguments beside it (same name, ``.json``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"timm_spec": json.dumps(spec)})
    spec_path = out.with_suffix(".json")
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    return out, spec_path


def export(source: str | Path, out: str | Path, which: str = "teacher") -> tuple[Path, Path]:
    """Export the encoder of a run directory or checkpoint."""
    state, _path = load_run_checkpoint(source)
    return write_encoder(encoder_state(state, which), spec_of(config_of(state)), out)


def read_spec(path: str | Path) -> dict[str, Any]:
    """The timm arguments of an exported file: the JSON beside it, else the safetensors metadata."""
    path = Path(path)
    if path.with_suffix(".json").is_file():
        return json.loads(path.with_suffix(".json").read_text())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "timm_spec" not in meta:
        raise FileNotFoundError(f"{path}: no {path.with_suffix('.json').name} beside it and no timm_spec metadata")
    return json.loads(meta["timm_spec"])


@dataclass
class ExportSource:
    """What an export needs from its source: the encoder and, for a conmim run, where it came from
    (the model card of ``--format hub`` reports the run's configuration and measurements)."""

    weights: dict[str, torch.Tensor]
    spec: dict[str, Any]
    config: Config | None = None  # None for an exported or converted .safetensors
    run_dir: Path | None = None  # the run directory the checkpoint belongs to
    step: int | None = None


def read_source(path: str | Path, which: str = "teacher") -> ExportSource:
    """The encoder of an exported ``.safetensors``, a run directory or a checkpoint, with its run."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return ExportSource(load_file(str(path)), read_spec(path))
    state, found = load_run_checkpoint(path)
    cfg = config_of(state)
    run_dir = path if path.is_dir() else found.parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    step = int(state["step"]) if "step" in state else None
    return ExportSource(encoder_state(state, which), spec_of(cfg), cfg, run_dir, step)


def load_pretrained(path: str | Path, which: str = "teacher") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encoder weights and timm spec of an exported ``.safetensors``, a run directory or a checkpoint."""
    source = read_source(path, which)
    return source.weights, source.spec


def random_weights(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """timm's own random initialisation of ``spec``'s architecture (the from-scratch baseline), drawn
    from torch's global generator: seed it first."""
    return timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]).state_dict()


def build_encoder(weights: dict[str, torch.Tensor], spec: dict[str, Any], **overrides: Any) -> torch.nn.Module:
    """The timm model of ``spec`` with ``weights`` loaded strictly."""
    model = timm.create_model(spec["model_name"], pretrained=False, **{**spec["kwargs"], **overrides})
    model.load_state_dict(weights, strict=True)
    return model


def load_encoder(path: str | Path, which: str = "teacher", **overrides: Any) -> torch.nn.Module:
    """The timm encoder of an exported file, a run directory or a checkpoint, weights loaded strictly."""
    return build_encoder(*load_pretrained(path, which), **overrides)
