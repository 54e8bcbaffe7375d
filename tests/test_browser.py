"""Both dashboards in a real browser: Debian chromium driven by playwright (never a downloaded browser).

One run with `--viz both` into servers started by `runner dashboards up`; the Visdom env shows the
run's panes with rendered plots, TensorBoard's pages render, and no request fails (a missing
offline asset would be a 404)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_runner
from tests.visdom_helpers import CHROMIUM_FLAGS, free_port

VISDOM_TITLES = ("train/loss", "train/psnr", "run demo", "model graph", "model layers", "images/samples",
                 "weights histograms · step 6", "grads histograms · step 6", "memory/rss (MiB)", "norms/weights")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian chromium is missing: `make browser` (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def _open(browser, url: str):  # noqa: ANN001, ANN202
    """A page at `url`, and the list its failed requests (network errors and HTTP errors) go to."""
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.url} (HTTP {r.status})"))
    page.goto(url)
    return page, failed


@pytest.mark.slow
def test_both_dashboards_render_the_run(tmp_path: Path, browser) -> None:  # noqa: ANN001
    runs, tb, vis = tmp_path / "runs", free_port(), free_port()
    up = run_runner("dashboards", "up", "--run-dir", str(runs), "--tb-port", str(tb), "--visdom-port", str(vis))
    try:
        assert up.code == 0, up.stderr
        train = run_runner("train", "--run-dir", str(runs), "--name", "demo", "--viz", "both", "--visdom-port",
                           str(vis), "--model", "tinyunet", "--image-size", "16", "--batch-size", "4", "--samples",
                           "32", "--steps", "6", "--log-every", "2", "--images-every", "3", "--hist-every", "3",
                           "--no-progress")
        assert train.code == 0, train.stderr

        page, failed = _open(browser, f"http://127.0.0.1:{vis}/env/demo")
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {12}", timeout=30000)
        page.locator(".window img").first.wait_for(timeout=30000)
        text = page.locator("#app").inner_text()
        for title in VISDOM_TITLES:
            assert title in text, title
        assert page.locator(".window svg rect").count() > 10  # the graph picture's boxes
        page.wait_for_timeout(500)
        assert failed == []

        page, failed = _open(browser, f"http://127.0.0.1:{tb}/#custom_scalars")
        for card in ("loss", "metric", "process RSS (bytes)"):
            page.get_by_text(card, exact=True).first.wait_for(timeout=30000)
        page, more = _open(browser, f"http://127.0.0.1:{tb}/#timeseries")
        page.get_by_text("demo").first.wait_for(timeout=30000)
        page.wait_for_timeout(1000)
        assert page.title() == "TensorBoard"
        assert failed + more == []
    finally:
        run_runner("dashboards", "down", "--run-dir", str(runs))
