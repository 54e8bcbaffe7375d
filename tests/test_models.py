"""The model registry: the tutorial models' shapes and parameter counts, user factories."""

from __future__ import annotations

import pytest
import torch

from runner.errors import RunnerError
from runner.models import build_model


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_parameter_counts_match_the_tutorials() -> None:
    assert _count(build_model("mlp", 1, 28, 10)) == 101_770
    assert _count(build_model("mlp", 3, 32, 10)) == 394_634


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_classifiers_give_logits(name: str) -> None:
    model = build_model(name, 1, 32, 7)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name, widths", [("tinyunet", (16, 32, 64, 128)), ("unet", (64, 128, 256, 512))])
def test_unets_keep_the_image_shape_and_widths(name: str, widths: tuple[int, ...]) -> None:
    model = build_model(name, 3, 16, 10)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    assert [model.enc1[0].out_channels, model.enc2[0].out_channels, model.enc3[0].out_channels,
            model.bottom[0].out_channels] == list(widths)


def test_user_factory_by_import_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("tests.support.models:nan_model", 1, 4, 10)
    assert _count(model) == 16 * 10 + 10


@pytest.mark.parametrize("path, fragment", [
    ("no_such_module:f", "cannot import model module"),
    ("tests.support.models:missing", "has no attribute 'missing'"),
    ("tests.support.models:not_a_model", "not a torch.nn.Module"),
])
def test_bad_user_models_are_clear(path: str, fragment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RunnerError, match=fragment) as err:
        build_model(path, 1, 4, 10)
    assert err.value.code == 2
