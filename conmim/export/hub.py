"""``conmim export --format hub``: a folder in timm's Hugging Face Hub layout.

``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``), ``model.safetensors`` and a
``README.md`` model card. timm builds the model from the folder alone, offline:
``timm.create_model("local-dir:FOLDER", pretrained=True)``; the same folder can be uploaded to the
Hub as it is. The card reports what the run itself recorded, so a published encoder carries its
configuration, data and measurements, not claims.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..config import to_yaml
from .encoders import ExportSource
from .onnx import ExportError

# The run's own measurements, read when present (written by conmim pretrain / knn / linprobe / finetune).
RESULT_FILES = ("final_eval.json", "knn/results.json", "linprobe/results.json", "finetune/results.json")
# ImageNet statistics: conmim's data default, used when the source carries no configuration.
DEFAULT_MEAN, DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def hub_config(source: ExportSource) -> dict[str, Any]:
    """timm's ``config.json``: the architecture, its arguments and the preprocessing.

    ``crop_pct`` 1.0 and bicubic resizing are what conmim's k-NN and linear probe feed the encoder
    (``conmim.eval.common.EvalTransform``); mean and std are the run's ``data.mean`` / ``data.std``.
    """
    kwargs = dict(source.spec["kwargs"])
    channels = int(kwargs.get("in_chans", 3))
    size = kwargs["img_size"]
    height, width = (size, size) if isinstance(size, int) else size
    data = source.config.data if source.config is not None else None
    if data is None and channels != 3:
        raise ExportError(
            f"a {channels}-channel encoder without its run configuration has no mean/std for config.json (the "
            "default is ImageNet's 3 values): export from the pre-training run directory or checkpoint"
        )
    return {
        "architecture": source.spec["model_name"],
        "num_classes": int(kwargs.get("num_classes", 0)),
        "num_features": int(kwargs["embed_dim"]),
        "global_pool": kwargs.get("global_pool", "token"),
        "model_args": kwargs,
        "pretrained_cfg": {
            "tag": "conmim",
            "custom_load": False,
            "input_size": [channels, int(height), int(width)],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(data.mean if data else DEFAULT_MEAN),
            "std": list(data.std if data else DEFAULT_STD),
            "num_classes": int(kwargs.get("num_classes", 0)),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def run_results(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    """The result files of ``RESULT_FILES`` found in ``run_dir``, without per-epoch histories."""
    found: dict[str, dict[str, Any]] = {}
    for name in RESULT_FILES:
        path = run_dir / name if run_dir is not None else None
        if path is not None and path.is_file():
            found[name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "history"}
    return found


def last_training_record(run_dir: Path | None) -> dict[str, Any] | None:
    """The last logged training step of ``metrics.jsonl`` (loss, retrieval accuracy, ...)."""
    path = run_dir / "metrics.jsonl" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    training = [r for r in records if "loss" in r]
    return training[-1] if training else None


def _table(values: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in values.items())
    return f"| field | value |\n|---|---|\n{rows}\n"


def model_card(source: ExportSource, which: str, config: dict[str, Any]) -> str:
    """README.md: how to load it, the model, the data, the run's measurements, its configuration."""
    args = config["model_args"]
    cfg = source.config
    title = f"ConMIM {args['embed_dim']}-wide, {args['depth']}-block ViT encoder ({which})"
    done = f" after {source.step} optimizer steps" if source.step is not None else ""
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        "tags:\n- image-feature-extraction\n- timm\n- conmim\n- masked-image-modeling",
        "---",
        f"# {title}",
        "",
        f"The {which} encoder of a ConMIM pre-training (masked image modeling with denoising contrast){done}, "
        "exported by `conmim export --format hub`. Headless: it returns features, not classes.",
        "",
        "## Use",
        "",
        "```python",
        "import timm, torch",
        "",
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True).eval()',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)",
        "tokens = model.forward_features(images)               # (B, 1 + patches, D), after the final norm",
        "features = tokens[:, model.num_prefix_tokens:].mean(1)  # mean patch token, what conmim evaluates",
        "```",
        "",
        "ConMIM's loss trains the patch tokens only; `model(images)` returns the [CLS] token "
        "(`global_pool='token'`), which the loss never sees.",
        "",
        "## Model",
        "",
        _table(
            {
                "timm architecture": f"{config['architecture']} (the class; sizes: model_args)",
                "input": "x".join(str(v) for v in config["pretrained_cfg"]["input_size"]),
                "patch size": args["patch_size"],
                "width / depth / heads": f"{args['embed_dim']} / {args['depth']} / {args['num_heads']}",
                "normalisation mean / std": f"{config['pretrained_cfg']['mean']} / {config['pretrained_cfg']['std']}"
                + ("" if cfg is not None else " (conmim's default: not recorded with these weights)"),
            }
        ),
    ]
    if cfg is None:
        lines += ["No training record came with these weights (exported or converted file).", ""]
        return "\n".join(lines)
    d = cfg.data
    lines += [
        "## Training data",
        "",
        f"`data.source={d.source}`, `data.path={d.path}`, `data.split={d.split}` (held-out split "
        f"`{d.eval_split}`), read without labels.",
        "",
        "## Measured on this run",
        "",
    ]
    results, last = run_results(source.run_dir), last_training_record(source.run_dir)
    if last is not None:
        lines += ["Last logged training step (`metrics.jsonl`):", "", _table(last)]
    for name, values in results.items():
        lines += [f"`{name}`:", "", _table(values)]
    if last is None and not results:
        lines += [f"No measurements were found in the run directory (`{source.run_dir}`).", ""]
    lines += ["## Training configuration", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def export_hub(source: ExportSource, out_dir: str | Path, which: str = "teacher") -> Path:
    """Write the folder ``out_dir`` (created; existing files of the same names are replaced)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: --format hub writes a folder, and this is a file")
    out.mkdir(parents=True, exist_ok=True)
    config = hub_config(source)
    save_file(source.weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "README.md").write_text(model_card(source, which, config))
    return out
