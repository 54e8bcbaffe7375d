"""Configuration: defaults, TOML, flag precedence, validation, the saved resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

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


@pytest.mark.parametrize("text", ['say "hi"', "back\\slash\\", "ünïcödé 名前", "it's", "a = 1 # no", "[train]"])
def test_any_printable_string_round_trips(tmp_path: Path, text: str) -> None:
    cfg = config.resolve(None, {"name": text.replace("/", ""), "data": f"imagefolder:{text}", "memory_budget": text,
                                "gpus": text})
    config.save(cfg, tmp_path / "config.toml")
    assert config.resolve(str(tmp_path / "config.toml"), {}) == cfg


@pytest.mark.parametrize("key, value", [("name", "a\nb"), ("name", "nul\x00"), ("name", "esc\x1b[31m"),
                                        ("experiment", "line\u2028sep")])
def test_control_characters_in_names_are_refused(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(RunnerError, match=f"{key} must not contain control characters") as err:
        config.resolve(None, {"name": "x", key: value})
    assert err.value.code == 2 and "\n" not in str(err.value)
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps({"train": {key: value}}), encoding="utf-8")
    with pytest.raises(RunnerError, match="must not contain control characters"):
        config.resolve(str(path), {"name": "x"} if key != "name" else {})


def test_misspelt_choices_get_a_suggestion() -> None:
    with pytest.raises(RunnerError, match=r"unknown viz 'visdmo': did you mean 'visdom'\? choose one of none,"):
        config.resolve(None, {"name": "x", "viz": "visdmo"})
    with pytest.raises(RunnerError, match=r"unknown model 'resnet81': did you mean 'resnet18'\?.*import path"):
        config.resolve(None, {"name": "x", "model": "resnet81"})
    with pytest.raises(RunnerError, match=r"unknown strategy 'zzz': choose one of single, dp, ddp$"):
        config.resolve(None, {"name": "x", "strategy": "zzz"})


def test_experiment_defaults_to_model_and_data_kind() -> None:
    assert config.resolve(None, {"name": "x", "model": "cnn", "data": "mnist:/d"}).experiment_name == "cnn-mnist"
    user = config.TrainConfig(model="my_pkg.models:tiny_net", data="my_pkg.sets:make")
    assert user.experiment_name == "tiny-net-sets"
    assert config.resolve(None, {"name": "x", "experiment": "ablation-3"}).experiment_name == "ablation-3"
    with pytest.raises(RunnerError, match="experiment must not contain '_'"):
        config.resolve(None, {"name": "x", "experiment": "a_b"})
