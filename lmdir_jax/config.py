"""Experiment configs: ml_collections `get_config()` files with `--config.key=value` overrides.

The defaults of each section live beside the code that reads them (`lmdir_jax/<section>/config.py`);
`configs/*.py` start from `base_config()` and change what differs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from lmdir_jax.data.config import default_config as data_config
from lmdir_jax.errors import UsageError
from lmdir_jax.models.config import default_config as model_config
from lmdir_jax.priors.config import default_config as priors_config
from lmdir_jax.train.config import default_config as train_config
from lmdir_jax.workdir import config_from_json as config_from_json  # re-exported
from lmdir_jax.workdir import config_to_json as config_to_json  # re-exported

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def base_config() -> ml_collections.ConfigDict:
    """All sections with their defaults: data, model, priors, train."""
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


def _override_args(overrides: list[str]) -> list[str]:
    """`config.a.b=v`, `a.b=v` or `--config.a.b=v` (as `cli.main` splits them off) -> absl args."""
    args = []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        key, sep, _ = text.partition("=")
        if not sep:
            raise UsageError(f"override '--{text}' needs the form --config.key=value")
        args.append("--" + (text if key.startswith("config.") else f"config.{text}"))
    return args


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Load `get_config()` from a config file (path or name) with `config.key=value` overrides.

    Loading and overriding go through `ml_collections.config_flags` (typed by each field's current
    value; tuples as `(1, 2)`); unknown keys and wrong types are `UsageError`s.
    """
    path = resolve_config_path(name_or_path)
    args = _override_args(list(overrides or []))
    defaults = _parse_config_flag(path, [])
    for arg in args:  # name the unknown key before absl would (its errors name only one part)
        key = arg[2:].partition("=")[0]
        try:
            config_path.get_value(key.partition(".")[2], defaults)
        except (KeyError, AttributeError, IndexError):
            raise UsageError(f"unknown config key: {key}") from None
    config = _parse_config_flag(path, args)
    for arg in args:  # a tuple field keeps its element type: blocks=abc is not ('a', 'b', 'c')
        key = arg[2:].partition("=")[0].partition(".")[2]
        old, new = config_path.get_value(key, defaults), config_path.get_value(key, config)
        if isinstance(old, tuple) and old and not all(
            isinstance(v, type(old[0])) or (isinstance(old[0], float) and isinstance(v, int))
            for v in new
        ):
            raise UsageError(f"bad value for config.{key}: {arg.partition('=')[2]} "
                             f"(a tuple of {type(old[0]).__name__}, e.g. {old})")
    if int(config.get("seed", 0)) < 0:  # numpy's generators take no negative seed
        raise UsageError(f"config.seed must be >= 0, got {config.seed}")
    return config


def _parse_config_flag(path: Path, args: list[str]) -> ml_collections.ConfigDict:
    """`get_config()` of `path` with absl-style `--config.key=value` args, via config_flags."""
    argv = ["lmdir", f"--config={path}", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=values,
                                    lock_config=False, sys_argv=argv)
    try:
        with warnings.catch_warnings():  # config_flags loads the file with a deprecated loader call
            warnings.simplefilter("ignore", DeprecationWarning)
            values(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        text = " ".join(str(e).split())
        if "get_config" in text:
            raise UsageError(f"{path} has no get_config()") from None
        raise UsageError(f"bad config override: {text}") from None
    return values.config
