"""Screenshots of both dashboards for the README: docs/visdom.png and docs/tensorboard.png.

Trains a short demo run into a temporary runs folder with `--viz both`, starts TensorBoard and Visdom
there on free ports (`runner dashboards up`), opens each in headless Debian chromium driven by
playwright (never a downloaded browser), saves the PNGs and stops the servers.

    .venv/bin/python scripts/screenshots.py [--out docs] [--steps 150]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def runner(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, check=True)


def shoot(url: str, out: Path, ready: str, width: int, height: int, settle_ms: int) -> None:
    """Open `url`, wait for the `ready` selector and the page to settle, save a full-page PNG."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("Debian chromium is missing: run `make browser` (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.locator(ready).first.wait_for(timeout=60000)
        page.wait_for_timeout(settle_ms)
        page.screenshot(path=str(out))
        browser.close()
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="runner-screenshots-") as tmp:
        runs, tb, vis = Path(tmp) / "runs", free_port(), free_port()
        runner("dashboards", "up", "--run-dir", str(runs), "--tb-port", str(tb), "--visdom-port", str(vis))
        try:
            runner("train", "--run-dir", str(runs), "--name", "demo", "--viz", "both", "--visdom-port", str(vis),
                   "--model", "tinyunet", "--image-size", "32", "--batch-size", "8", "--samples", "256",
                   "--steps", str(args.steps), "--log-every", "5", "--images-every", "50", "--hist-every", "50",
                   "--val-split", "0.2", "--eval-every", "10", "--no-progress")  # train and val curves together
            env = "tinyunet-synthetic_demo"  # <experiment>_<run>: the experiment is <model>-<data>
            shoot(f"http://127.0.0.1:{vis}/env/{env}", out / "visdom.png", ".window img", 1600, 1500, 3000)
            shoot(f"http://127.0.0.1:{tb}/#custom_scalars", out / "tensorboard.png", "text=process RSS (bytes)",
                  1400, 1000, 4000)
        finally:
            runner("dashboards", "down", "--run-dir", str(runs))


if __name__ == "__main__":
    main()
