"""report.html renders in a real headless browser.

Skipped where Chromium is not installed, except in CI (`CI` set): `.ci/run` installs it, so a
missing browser there is a failure, not a silent skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import viz_helpers as h

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def chromium_installed() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} not installed (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: .ci/run installs it, so CI must not skip the browser check")
    pytest.skip(message)


def screenshot(html: Path, png: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    """Chromium's own screenshot of a local page; no network, no profile state kept."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--screenshot={png}",
        "--window-size=1280,2000",
        html.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_report_html_renders_in_chromium(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    _, out = h.shared_viz(tmp_path_factory)
    # Render a copy away from figures/: the page must not need anything next to it.
    page = tmp_path / "alone" / "report.html"
    page.parent.mkdir()
    shutil.copy(out / "report.html", page)
    png = tmp_path / "shot.png"
    result = screenshot(page, png, tmp_path / "profile")
    assert png.is_file(), f"no screenshot; chromium said:\n{result.stderr[-2000:]}"
    assert h.png_size(png) == (1280, 2000)

    from PIL import Image

    with Image.open(png) as image:
        rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    # Not blank: the page background, text and embedded figures give many colours, and the
    # lower part (where the figures are) is not a single flat colour.
    assert np.unique(rgb.reshape(-1, 3), axis=0).shape[0] > 500
    lower = rgb[1000:]
    assert lower.std() > 20
    # Embedded figures were decoded: saturated colours (plot lines, colour maps) are present,
    # which the page's own greys and pale table headers never produce.
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    assert np.mean(saturation > 80) > 0.002


@pytest.mark.timeout(600)
def test_mlflow_ui_shows_the_search_parent_and_its_children(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The MLflow UI on loopback over a finished search: its runs page lists the parent, and
    expanding it lists the trials (headless Chromium driven by Playwright; a screenshot)."""
    import sys

    from playwright.sync_api import sync_playwright

    from conftest import free_port, wait_for_http

    search = h.shared_search(tmp_path_factory)
    port = free_port()
    log = tmp_path / "ui.log"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow_bin), "server", "--backend-store-uri", search.tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, log, 120)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{search.experiment_id}/runs")
            parent = page.locator("[role=row]", has_text="search").first
            parent.wait_for(timeout=90_000)
            # Nested runs start collapsed under their parent: expand it.
            parent.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            page.get_by_text("dnn-trial", exact=True).first.wait_for(timeout=60_000)
            names = set(page.locator("[role=row] a").all_inner_texts())
            page.screenshot(path=str(tmp_path / "runs.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert {"search", "cnn-trial", "dnn-trial"} <= names, names
    assert h.png_size(tmp_path / "runs.png") == (1400, 1000)
