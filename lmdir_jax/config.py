"""Experiment configs: ml_collections `get_config()` files with `--config.key=value` overrides.

The defaults of each section live beside the code that reads them (`lmdir_jax/<section>/config.py`);
`configs/*.py` start from `base_config()` and change what differs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import ml_collections

from lmdir_jax.errors import UsageError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def base_config() -> ml_collections.ConfigDict:
    """All sections with their defaults: data, model, priors, train."""
    from lmdir_jax.data.config import default_config as data_config
    from lmdir_jax.models.config import default_config as model_config
    from lmdir_jax.priors.config import default_config as priors_config
    from lmdir_jax.train.config import default_config as train_config

    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.data = data_config()
    c.model = model_config()
    c.priors = priors_config()
    c.train = train_config()
    return c


def resolve_config_path(name_or_path: str) -> Path:
    """A config file from a path, or from a bare name such as `tiny` looked up in `configs/`."""
    p = Path(name_or_path)
    if p.suffix == ".py" and p.is_file():
        return p
    for folder in (Path.cwd() / "configs", REPO_CONFIGS):
        cand = folder / f"{p.stem if p.suffix == '.py' else name_or_path}.py"
        if cand.is_file():
            return cand
    raise UsageError(f"config not found: {name_or_path} (give a path to a .py file or a name in configs/)")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `config.a.b=value` strings; unknown keys and wrong types are user errors."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"override '--{item}' needs the form --config.key=value")
        path = key.split(".")[1:] if key.startswith("config.") else key.split(".")
        node = config
        for part in path[:-1]:
            if part not in node:
                raise UsageError(f"unknown config key: {key}")
            node = node[part]
        leaf = path[-1]
        if leaf not in node:
            raise UsageError(f"unknown config key: {key}")
        value = _parse_value(raw)
        old = node[leaf]
        if isinstance(old, str) and not isinstance(value, str):
            value = raw
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, list) and isinstance(value, tuple):
            value = list(value)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            with node.unlocked() if hasattr(node, "unlocked") else _null():
                node[leaf] = value
        except TypeError as e:
            raise UsageError(f"bad value for {key}: {raw} ({e})") from None
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Load `get_config()` from a config file (path or name) and apply overrides."""
    path = resolve_config_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"lmdir_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"{path} has no get_config()")
    config = module.get_config()
    return apply_overrides(config, list(overrides or []))


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (saved as `WORKDIR/config.json`)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json`: a ConfigDict with the saved values (tuples come back as lists)."""
    return ml_collections.ConfigDict(json.loads(text))
