"""Configs load by name or path, overrides are typed, and CLI misuse exits 2 with one line."""

import pytest

from lmdir_jax.cli import main, split_config_overrides
from lmdir_jax.config import config_from_json, config_to_json, load_config
from lmdir_jax.errors import UsageError


@pytest.mark.parametrize("name", ["tiny", "quickstart", "bsds", "paper", "three_task", "five_task"])
def test_every_config_loads_with_all_sections(name):
    c = load_config(name)
    assert c.name == name
    for section in ("data", "model", "priors", "train"):
        assert section in c


def test_overrides_are_typed():
    c = load_config("configs/tiny.py", ["config.train.steps=7", "config.train.lr=1", "config.data.source=/x"])
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.data.source == "/x"
    c = load_config("tiny", ["config.model.blocks=(2,2,2,2)"])
    assert tuple(c.model.blocks) == (2, 2, 2, 2)


@pytest.mark.parametrize(
    "override", ["config.train.nope=1", "config.nosection.steps=1", "config.train.steps=abc"]
)
def test_bad_overrides_are_usage_errors(override):
    with pytest.raises(UsageError):
        load_config("tiny", [override])


def test_config_json_round_trip():
    c = load_config("quickstart")
    back = config_from_json(config_to_json(c))
    assert back.model.width == c.model.width
    assert list(back.model.blocks) == list(c.model.blocks)


def test_split_config_overrides_both_forms():
    rest, ov = split_config_overrides(["train", "--config", "tiny", "--config.a.b=1", "--config.c", "2"])
    assert rest == ["train", "--config", "tiny"]
    assert ov == ["config.a.b=1", "config.c=2"]


def test_missing_config_exits_2_with_one_line(capsys):
    assert main(["train", "--config", "no_such_config", "--workdir", "/tmp/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config not found" in err[0]


def test_unknown_command_exits_2_with_one_line(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_override_on_command_without_config_exits_2(capsys):
    assert main(["report", "--workdir", "x", "--output", "y.md", "--config.train.steps=3"]) == 2
    assert "no --config overrides" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["config.priors.auto_ratio=25", "config.priors.drop_scene=-0.1"])
def test_prior_share_outside_0_1_exits_2_before_any_work(tmp_path, capsys, override):
    """A priors probability outside [0, 1] (auto_ratio=25 for 0.25) is refused in one line, and no
    run folder is made."""
    workdir = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--workdir", str(workdir), f"--{override}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = override.split("=")[0].removeprefix("config.")
    assert len(err) == 1 and f"{name} must be in [0, 1]" in err[0], err
    assert not workdir.exists()
