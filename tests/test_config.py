"""Configuration: defaults, TOML, flag precedence, validation, the saved resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import config
from runner.errors import RunnerError


def test_flags_override_file_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[train]\nmodel = "mlp"\nlr = 0.5\nsteps = 7\n')
    cfg = config.resolve(str(path), {"lr": 0.1, "steps": None, "name": "x"})
    assert (cfg.model, cfg.lr, cfg.steps, cfg.name) == ("mlp", 0.1, 7, "x")
    assert cfg.batch_size == config.TrainConfig().batch_size


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config.resolve(None, {"model": "cnn", "batch_size": "auto", "name": "r", "data": "imagefolder:/a b/c"})
    config.save(cfg, tmp_path / "config.toml")
    again = config.resolve(str(tmp_path / "config.toml"), {})
    assert again == cfg


@pytest.mark.parametrize("overrides, fragment", [
    ({"model": "vgg"}, "unknown model 'vgg'"),
    ({"data": "lmdb:/x"}, "unknown data"),
    ({"task": "segment"}, "unknown task"),
    ({"batch_size": "0"}, "batch-size must be at least 1"),
    ({"batch_size": "many"}, "batch-size: expected"),
    ({"data": "imagefolder"}, "needs a path"),
    ({"model": "unet", "image_size": 30}, "multiple of 8"),
    ({"lr": 0}, "lr must be positive"),
])
def test_bad_values_are_usage_errors(overrides: dict, fragment: str) -> None:
    with pytest.raises(RunnerError) as err:
        config.resolve(None, {"name": "x", **overrides})
    assert err.value.code == 2
    assert fragment in str(err.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nmodell = 'mlp'\n")
    with pytest.raises(RunnerError, match="unknown key.*modell"):
        config.resolve(str(path), {})


def test_task_auto() -> None:
    assert config.TrainConfig(model="tinyunet").resolved_task == "denoise"
    assert config.TrainConfig(model="mlp").resolved_task == "classify"
    assert config.TrainConfig(model="cnn", data="paired:a,b").resolved_task == "denoise"


def test_parse_bytes() -> None:
    assert config.parse_bytes("2GiB") == 2 * 1024**3
    assert config.parse_bytes("512MiB") == 512 * 1024**2
    assert config.parse_bytes("1.5GB") == 1_500_000_000
    assert config.parse_bytes("1G") == 1024**3
    with pytest.raises(RunnerError):
        config.parse_bytes("lots")
