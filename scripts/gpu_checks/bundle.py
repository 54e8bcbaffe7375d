"""`make gpu-bundle`: one git-ignored folder with what the GPU machine's Python lacks.

The GPU machine (Python 3.12, its own torch/torchvision/tensorboard/typer/rich/psutil/nvidia-ml-py/
requests/scipy/networkx/pillow) reaches no package registry. It lacks visdom (an sdist: built into a
wheel here), tornado<6.6, visdom's other pure dependencies, and the packages this project added
(tomli-w, google-crc32c: a C wheel for CPython 3.12; py-spy, whose binary lands in site/bin, put on PATH
for the stall check's stacks). Visdom's JS/CSS/fonts, installed here from npm
into site-packages/visdom/static, travel as one xz tarball (MathJax makes them 56 MB unpacked).
Versions are those of this venv, so the GPU run uses what the tests here used.

    python -m scripts.gpu_checks.bundle build .gpu-bundle
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
from pathlib import Path

BUNDLE = ".gpu-bundle"
LIMIT = 60 << 20  # the bundle's budget; the whole working tree that travels may be 64 MiB
BUILT = ("visdom",)  # sdists: built into wheels here
DOWNLOADED = ("tornado", "jsonpatch", "jsonpointer", "websocket-client", "tomli-w", "google-crc32c", "py-spy")
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
ASSETS = "visdom_static.tar.xz"

# The one line that installs the bundle on the GPU machine and runs the acceptance (repository root).
SHELL_LINE = (
    'T=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --target "$T/site" '
    f"{BUNDLE}/wheels/*.whl && python3 -m tarfile -e {BUNDLE}/{ASSETS} \"$T/site/visdom\" && "
    'PATH="$T/site/bin:$PATH" PYTHONPATH="$T/site:$PWD" PYTHONUNBUFFERED=1 '
    'python3 scripts/gpu_acceptance.py --out "$OUT" ${ACCEPT:-}')


def pins(names: tuple[str, ...]) -> list[str]:
    """`name==version` as installed in this environment."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(folder: Path) -> int:
    """Fill `folder` (emptied first); returns its size in bytes."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    wheels = folder / "wheels"
    wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), *pins(BUILT)], check=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
                    "--implementation", "cp", *platforms, "-d", str(wheels), *pins(DOWNLOADED)], check=True)
    static = _visdom_static()
    with tarfile.open(folder / ASSETS, "w:xz") as tar:
        tar.add(static, arcname="static")
    return size(folder)


def _visdom_static() -> Path:
    """site-packages/visdom/static of this environment, checked to be complete (version.built)."""
    import visdom

    static = Path(visdom.__file__).parent / "static"
    if not (static / "version.built").is_file():
        raise SystemExit(f"{static} has no version.built: run `runner dashboards install-assets` first")
    return static


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "build":
        print("usage: python -m scripts.gpu_checks.bundle build FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[1])
    total = build(folder)
    wheels = sorted(p.name for p in (folder / "wheels").iterdir())
    print(f"{folder}: {total / 2**20:.1f} MiB ({len(wheels)} wheels: {', '.join(wheels)}; {ASSETS})")
    if total >= LIMIT:
        print(f"{folder} is over {LIMIT >> 20} MiB", file=sys.stderr)
        return 1
    print(f"on the GPU machine, from the repository root:\n  {SHELL_LINE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
