"""Visdom's JS/CSS/fonts, installed once from the npm registry so its server never fetches at run time.

The stock `visdom.server` downloads these from CDNs before it even parses its flags, and exits when
offline. Its `server/build.py` skips every download when each file it names exists under
`visdom/static/` and `static/version.built` holds the visdom version: this module puts them there,
from `npm pack` tarballs of the exact versions `build.py` asks for. No torch or visdom import.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from runner.errors import RunnerError

# (npm package@version, file or folder inside the package, destination under static/), as build.py names them.
BOOTSTRAP = "bootstrap@3.3.7"
MATHJAX = "mathjax@2.7.5"
_GLYPHS = "glyphicons-halflings-regular"
ASSETS: tuple[tuple[str, str, str], ...] = (
    ("jquery@3.1.1", "dist/jquery.min.js", "js/jquery.min.js"),
    (BOOTSTRAP, "dist/js/bootstrap.min.js", "js/bootstrap.min.js"),
    (BOOTSTRAP, "dist/css/bootstrap.min.css", "css/bootstrap.min.css"),
    (BOOTSTRAP, f"dist/fonts/{_GLYPHS}.eot", f"fonts/{_GLYPHS}.eot"),
    (BOOTSTRAP, f"dist/fonts/{_GLYPHS}.woff2", f"fonts/{_GLYPHS}.woff2"),
    (BOOTSTRAP, f"dist/fonts/{_GLYPHS}.woff", f"fonts/{_GLYPHS}.woff"),
    (BOOTSTRAP, f"dist/fonts/{_GLYPHS}.ttf", f"fonts/{_GLYPHS}.ttf"),
    # build.py checks this literal name; browsers ask for the plain .svg (the fragment is not sent).
    (BOOTSTRAP, f"dist/fonts/{_GLYPHS}.svg", f"fonts/{_GLYPHS}.svg#glyphicons_halflingsregular"),
    (BOOTSTRAP, f"dist/fonts/{_GLYPHS}.svg", f"fonts/{_GLYPHS}.svg"),
    ("react@16.2.0", "umd/react.production.min.js", "js/react-react.min.js"),
    ("react-dom@16.2.0", "umd/react-dom.production.min.js", "js/react-dom.min.js"),
    ("react-modal@3.1.10", "dist/react-modal.min.js", "js/react-modal.min.js"),
    ("plotly.js-dist-min@2.11.1", "plotly.min.js", "js/plotly-plotly.min.js"),
    ("sjcl@1.0.7", "sjcl.js", "js/sjcl.js"),
    ("layout-bin-packer@1.4.0", "dist/layout-bin-packer.js", "js/layout_bin_packer.js"),
    ("layout-bin-packer@1.4.0", "dist/layout-bin-packer.js.map", "js/layout-bin-packer.js.map"),
    ("d3@3.5.17", "d3.min.js", "js/d3.v3.min.js"),
    ("d3-selection-multi@1.0.1", "build/d3-selection-multi.js", "js/d3-selection-multi.v1.js"),
    ("save-svg-as-png@1.4.17", "lib/saveSvgAsPng.js", "js/saveSvgAsPng.js"),
    ("react-resizable@1.4.6", "css/styles.css", "css/react-resizable-styles.css"),
    ("react-grid-layout@0.16.3", "css/styles.css", "css/react-grid-layout-styles.css"),
    ("classnames@2.2.5", "index.js", "fonts/classnames"),
    (MATHJAX, "MathJax.js", "js/mathjax/2.7.5/MathJax.js"),
    (MATHJAX, "config", "js/mathjax/2.7.5/config"),
    (MATHJAX, "extensions", "js/mathjax/2.7.5/extensions"),
    (MATHJAX, "jax", "js/mathjax/2.7.5/jax"),
    (MATHJAX, "fonts", "js/mathjax/2.7.5/fonts"),
    (MATHJAX, "localization", "js/mathjax/2.7.5/localization"),
)
# The MathJax files build.py checks one by one (it fetches any that is missing, built or not).
MATHJAX_CHECKED = (
    "config/Safe.js", "config/TeX-AMS-MML_HTMLorMML.js", "extensions/Safe.js", "jax/output/SVG/fonts/TeX/fontdata.js",
    "jax/output/SVG/jax.js", "jax/output/SVG/fonts/TeX/Size1/Regular/Main.js", "jax/output/SVG/config.js", "MathJax.js",
)


def visdom_package_dir() -> Path:
    """The installed `visdom` package folder, found without importing it (its import pulls in torch)."""
    spec = importlib.util.find_spec("visdom")
    if spec is None or spec.origin is None:
        raise RunnerError("visdom is not installed in this environment (pip install visdom==0.2.4)")
    return Path(spec.origin).parent


def visdom_version() -> str:
    return (visdom_package_dir() / "VERSION").read_text().strip()


def static_dir() -> Path:
    return visdom_package_dir() / "static"


def _required(static: Path) -> list[Path]:
    files = [static / dest for _, _, dest in ASSETS]
    return files + [static / "js/mathjax/2.7.5" / name for name in MATHJAX_CHECKED]


def missing_assets(static: Path | None = None) -> list[str]:
    """Files the offline server still needs (empty when installed for this visdom version)."""
    static = static or static_dir()
    missing = [str(p.relative_to(static)) for p in _required(static) if not p.exists()]
    built = static / "version.built"
    if not built.is_file() or built.read_text().strip() != visdom_version():
        missing.append("version.built")
    return missing


def _npm_pack(packages: list[str], into: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RunnerError("npm not found: install Node.js/npm (e.g. apt-get install npm), then run "
                          "`runner dashboards install-assets` again")
    proc = subprocess.run([npm, "pack", "--silent", *packages], cwd=into, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunnerError(f"npm pack failed ({detail}); is the npm registry reachable (npm config get registry)?")


def _extract(tarball: Path, into: Path) -> Path:
    into.mkdir()
    proc = subprocess.run(["tar", "--warning=no-unknown-keyword", "-xzf", str(tarball), "-C", str(into)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunnerError(f"cannot extract {tarball.name}: {proc.stderr.strip()}")
    return into / "package"


def _copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, dest)


def install(static: Path | None = None, force: bool = False) -> bool:
    """Put every asset under visdom's static/ and stamp version.built. False when already there."""
    static = static or static_dir()
    if not force and not missing_assets(static):
        return False
    if not os.access(static, os.W_OK):
        raise RunnerError(f"cannot write to {static}: run install-assets as the owner of the environment")
    packages = list(dict.fromkeys(package for package, _, _ in ASSETS))
    with tempfile.TemporaryDirectory(prefix="visdom-assets-") as tmp:
        work = Path(tmp)
        _npm_pack(packages, work)
        roots: dict[str, Path] = {}
        for package in packages:
            name, version = package.rsplit("@", 1)
            tarball = work / f"{name.replace('@', '').replace('/', '-')}-{version}.tgz"
            if not tarball.is_file():
                raise RunnerError(f"npm pack did not produce {tarball.name}")
            roots[package] = _extract(tarball, work / f"x-{tarball.stem}")
        built = static / "version.built"
        built.unlink(missing_ok=True)  # a half-finished install must not look complete
        for package, inside, dest in ASSETS:
            source = roots[package] / inside
            if not source.exists():
                raise RunnerError(f"{package} has no {inside}: the npm registry served an unexpected package")
            _copy(source, static / dest)
        built.write_text(visdom_version())
    return True
