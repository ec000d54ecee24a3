"""End to end: start `kstory app` on a demo run and drive it in headless Chromium (Playwright, system browser)."""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

import kstory  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SCREENSHOT_DIR = Path(os.environ.get("KSTORY_APP_SCREENSHOTS", "test-artifacts"))

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason=f"{CHROMIUM} missing: apt-get install -y chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def test_browser_loads_run_rerolls_and_packages(demo_runs: Path) -> None:
    from kstory.cli.launch import start

    port = _free_port()
    server = start(Path("demo"), demo_runs, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the app did not start")
                time.sleep(0.5)
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 2200})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/")
            sidebar = page.get_by_test_id("stSidebar")
            sidebar.get_by_text("Story", exact=True).click()
            page.get_by_text("Re-roll a frame").first.wait_for()
            page.get_by_role("button", name="Re-roll frame 3").first.click()  # 1 and 2: identity frames
            page.get_by_role("button", name="Cancel").first.wait_for()  # the job's panel, polled while it runs
            page.get_by_text("Re-roll frame 3 and score the story: done").first.wait_for(timeout=180_000)
            page.get_by_text("8. frame 8").first.wait_for()  # the page may still hold the previous run's copy
            scored = page.get_by_text(re.compile(r"^seed \d+ · aesthetic"))
            deadline = time.monotonic() + 60
            while scored.count() != 8 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert scored.count() == 8
            page.wait_for_timeout(1000)  # let the last images paint before the screenshot
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / "app-story.png"), full_page=True)
            sidebar.get_by_text("Package", exact=True).click()
            page.get_by_label("Team name").first.fill("kteam")
            page.get_by_label("Suffix").first.fill("fox")
            page.get_by_label("Suffix").first.press("Enter")
            page.get_by_text("model name: kteam").first.wait_for()
            page.get_by_text("Package even though the gate failed").first.click()
            page.get_by_text("Package a test artefact").first.click()  # the tiny models: labelled as a test artefact
            page.get_by_role("button", name="Build package").first.click()
            page.get_by_text(re.compile(r"Build the package .*: done")).first.wait_for(timeout=180_000)
            page.get_by_text("Model card preview").first.wait_for()
            page.screenshot(path=str(SCREENSHOT_DIR / "app-package.png"), full_page=True)
            browser.close()
        assert (demo_runs / "demo" / "submission" / "README.md").is_file()
    finally:
        server.terminate()
        server.wait(timeout=20)
