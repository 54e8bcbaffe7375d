"""Data sources: synthetic determinism, folders, unreadable images, pairs, weighted sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from runner.config import TrainConfig
from runner.data import EpochSampler, SyntheticDenoise, build_dataset, class_weights
from runner.errors import RunnerError
from tests.support.runs import TINY


def _png(path: Path, value: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value // 2, 255 - value)).save(path)


def _plant_corrupt(folder: Path) -> None:
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    good = folder / "good_for_truncation.png"
    _png(good, 10, size=64)
    (folder / "truncated.png").write_bytes(good.read_bytes()[:60])
    good.unlink()


def test_synthetic_is_deterministic_and_noisy() -> None:
    a, b = SyntheticDenoise(4, 3, 16, 0.2, seed=1), SyntheticDenoise(4, 3, 16, 0.2, seed=1)
    noisy, clean = a[2]
    assert torch.equal(noisy, b[2][0]) and torch.equal(clean, b[2][1])
    assert not torch.equal(a[1][1], a[2][1])
    assert 0.05 < (noisy - clean).abs().mean() < 0.3
    assert not torch.equal(SyntheticDenoise(4, 3, 16, 0.2, seed=2)[2][1], clean)


def test_imagefolder_skips_and_reports_unreadable(tmp_path: Path, cli) -> None:
    root = tmp_path / "images"
    for i in range(6):
        _png(root / "cats" / f"{i}.png", 20 * i)
        _png(root / "dogs" / f"{i}.png", 200 - 20 * i)
    _plant_corrupt(root / "dogs")
    out = cli("train", "--model", "cnn", "--data", f"imagefolder:{root}", "--steps", "6", "--run-dir",
              str(tmp_path / "runs"), "--name", "f", *TINY, "--progress")
    assert out.code == 0, out.stderr
    assert "skipped 3 unreadable sample(s)" in out.stderr
    named = [line for line in out.stderr.splitlines() if "unreadable, skipped:" in line]
    assert named and all(str(root / "dogs") in line for line in named), out.stderr
    assert {"zero.png", "text.jpg", "truncated.png"} == {
        Path(item.split(" (")[0]).name for line in named for item in line.split("skipped: ", 1)[1].split("; ")}
    assert "(UnidentifiedImageError)" in out.stderr or "(OSError)" in out.stderr


def test_all_unreadable_is_a_clear_error(tmp_path: Path, cli) -> None:
    root = tmp_path / "images" / "only"
    root.mkdir(parents=True)
    _plant_corrupt(root)
    out = cli("train", "--model", "mlp", "--data", f"imagefolder:{root.parent}", "--steps", "3",
              "--run-dir", str(tmp_path / "runs"), *TINY)
    assert out.code == 1
    assert "unreadable" in out.stderr and "Traceback" not in out.stderr


def test_paired_folders_match_by_name(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        _png(tmp_path / "noisy" / name, 30)
        _png(tmp_path / "clean" / name, 40)
    cfg = TrainConfig(data=f"paired:{tmp_path / 'noisy'},{tmp_path / 'clean'}", image_size=16)
    dataset = build_dataset(cfg, "denoise")
    noisy, clean = dataset[0]
    assert len(dataset) == 2 and noisy.shape == clean.shape == (3, 16, 16)
    _png(tmp_path / "noisy" / "c.png", 50)
    with pytest.raises(RunnerError, match="no partner") as err:
        build_dataset(cfg, "denoise")
    assert err.value.code == 2


@pytest.mark.parametrize("data, fragment", [
    ("imagefolder:/no/such/dir", "data folder not found"),
    ("paired:/no/a,/no/b", "data folder not found"),
    ("mnist:/no/such/root", "pass --download"),
    ("tests.support.models:nothing", "has no attribute"),
])
def test_missing_data_is_a_usage_error(data: str, fragment: str, tmp_path: Path, cli) -> None:
    out = cli("train", "--model", "mlp", "--data", data, "--steps", "2", "--run-dir", str(tmp_path), *TINY)
    assert out.code == 2, out.stderr
    assert fragment in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_user_dataset_by_import_path(tmp_path: Path, cli) -> None:
    out = cli("train", "--model", "tinyunet", "--data", "tests.support.models:pairs", "--task", "denoise",
              "--steps", "3", "--run-dir", str(tmp_path), "--name", "u", *TINY)
    assert out.code == 0, out.stderr


def test_weighted_sampling_balances_classes() -> None:
    class Skewed(torch.utils.data.Dataset):
        targets = [0] * 90 + [1] * 10

    weights = class_weights(Skewed())
    drawn = [Skewed.targets[i] for i in EpochSampler(100, seed=0, weights=weights)]
    assert 30 < sum(drawn) < 70  # ~50 of 100 draws from the 10% class


def test_epoch_sampler_resumes_mid_epoch() -> None:
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume_at(4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the offset applies once
