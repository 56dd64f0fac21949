"""Loading a configuration: defaults, then a YAML file or packaged preset, then ``key=value`` overrides.

OmegaConf rejects unknown keys and wrong types; :func:`load_config` turns its errors into one line
naming the key and what is allowed, maps the keys earlier versions used, fills in per-channel
normalisation for non-RGB inputs, and runs the command's checks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .checks import validate
from .commands import COMMAND_KEYS
from .sections import Config, ConfigError

log = logging.getLogger(__name__)

# Keys that earlier versions wrote into run configurations and that no longer exist: dropped when an old
# run's config.yaml or checkpoint is read, so its directory still works with every command.
RETIRED_KEYS = ("train.inject_nan_steps",)
# Keys that moved: an old run's config.yaml maps them silently, an override with the old name with a warning.
RENAMED_KEYS = {
    "train.seed": "seed",
    "train.precision": "precision",
    "train.dist_timeout_s": "dist_timeout_s",
    "eval.train_limit": "data.train_limit",
    "eval.test_limit": "data.test_limit",
}
# Fashion-MNIST's own statistics (all 60,000 training images: `conmim stats model.in_chans=1`)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET = Config().data


def preset_path(name: str) -> Path:
    """Path of a YAML preset shipped inside the package (``configs/NAME.yaml``)."""
    path = Path(str(resources.files("conmim") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available)}")
    return path


def without_retired(raw: Any) -> Any:
    """An OmegaConf node (or plain dict) of a stored configuration, less the :data:`RETIRED_KEYS` and
    with the :data:`RENAMED_KEYS` under their new names."""
    node = OmegaConf.create(raw) if not OmegaConf.is_config(raw) else raw
    for dotted in (*RETIRED_KEYS, *RENAMED_KEYS):
        section, key = dotted.rsplit(".", 1)
        parent = OmegaConf.select(node, section)
        if parent is not None and key in parent:
            value = parent.pop(key)
            if dotted in RENAMED_KEYS and OmegaConf.select(node, RENAMED_KEYS[dotted]) is None:
                OmegaConf.update(node, RENAMED_KEYS[dotted], value, force_add=True)
    return node


def renamed_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``key=value`` overrides, old key names replaced by their new ones (with one warning each)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in RENAMED_KEYS:
            log.warning("%s is now %s; using %s=%s", key, RENAMED_KEYS[key], RENAMED_KEYS[key], value)
            item = f"{RENAMED_KEYS[key]}={value}"
        out.append(item)
    return out


def load_config(
    config_file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    default_preset: str | None = None,
    schema_cls: type[Config] = Config,
    check: bool = True,
    command: str | None = None,
) -> Config:
    """Merge defaults, then a YAML file (or a packaged preset), then ``key=value`` overrides.

    ``schema_cls`` is :class:`Config` or a subclass with extra sections (``conmim bench``);
    ``command`` picks the checks (None: every section's); ``check=False`` skips them.
    """
    schema = OmegaConf.structured(schema_cls)
    layers: list[Any] = [schema]
    source = config_file or (str(preset_path(default_preset)) if default_preset else None)
    try:
        if source:
            if not os.path.isfile(source):
                source = str(preset_path(source))  # allow a preset name instead of a file
            layers.append(without_retired(OmegaConf.load(source)))
        layers.append(OmegaConf.from_dotlist(renamed_overrides(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, f"{source or 'defaults'} + overrides")) from None
    given = any(OmegaConf.select(layer, "data.mean") is not None for layer in layers[1:])
    if not given:
        _default_normalization(cfg)
    if check:
        validate(cfg, command)
    return cfg


def _default_normalization(cfg: Config) -> None:
    """``model.in_chans != 3`` without ``data.mean``/``data.std``: per-channel defaults, with a warning."""
    d, chans = cfg.data, cfg.model.in_chans
    if len(d.mean) == chans or (d.mean, d.std) != (IMAGENET.mean, IMAGENET.std):
        return
    if d.source == "fashion_mnist":
        d.mean, d.std = [FASHION_MNIST_MEAN] * chans, [FASHION_MNIST_STD] * chans
        log.info("model.in_chans=%d on Fashion-MNIST: its own statistics as data.mean/data.std", chans)
        return
    d.mean, d.std = [0.5] * chans, [0.25] * chans
    log.warning(
        "model.in_chans=%d and no data.mean/data.std given: using 0.5/0.25 for every channel; "
        "`conmim stats model.in_chans=%d data.source=%s data.path=%s` measures your data's",
        chans,
        chans,
        d.source,
        d.path,
    )


def _fields_under(dotted: str, schema_cls: type = Config) -> list[str] | None:
    """Field names of the config section at ``dotted`` ('' = top level), or None if it is no section."""
    node: Any = schema_cls()
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part, None)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None


def _explain(err: OmegaConfBaseException, where: str) -> str:
    """OmegaConf's error as one line naming the key, the value and what is allowed."""
    full_key = str(getattr(err, "full_key", "") or "")
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    if isinstance(err, ConfigKeyError) and full_key:
        parent = full_key.rpartition(".")[0]
        allowed = _fields_under(parent)
        listing = f"; allowed keys under {parent or 'the top level'}: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {full_key!r} ({where}){listing}"
    if full_key:
        return f"{full_key}: {msg} ({where})"
    return f"bad configuration ({where}): {msg}"


def to_yaml(cfg: Config, command: str | None = None) -> str:
    """The configuration as YAML: every section, or only the keys ``command`` reads."""
    full = OmegaConf.to_container(OmegaConf.structured(cfg))
    if command is None:
        return OmegaConf.to_yaml(full)
    view: dict[str, Any] = {}
    for dotted in COMMAND_KEYS[command]:
        section, _, key = dotted.partition(".")
        if key:
            view.setdefault(section, {})[key] = full[section][key]
        else:
            view[section] = full[section]
    return OmegaConf.to_yaml(view)
