"""`zk0 app-check`: the marimo results app served headless and loaded in headless Chromium."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from zk0lib.workbook import notebooks_dir

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def app_path() -> Path:
    return notebooks_dir() / "results_app.py"


def check_app(
    runs_dir: Path, screenshot: Path, expect: str, timeout_s: float = 120.0, chromium: str = "/usr/bin/chromium"
) -> dict[str, Any]:
    """Serve the marimo app headless, load it in headless Chromium, wait for `expect` (e.g. a run id)
    to appear in the run list, and save a screenshot. Stops the server whatever happens."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    if not Path(chromium).exists():
        raise FileNotFoundError(f"{chromium} not found: install Debian's chromium (apt-get install chromium)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ZK0_RUNS_DIR=str(runs_dir))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    log = open(screenshot.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marimo",
            "run",
            str(app_path()),
            "--headless",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-token",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    t0 = time.perf_counter()
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"marimo did not serve the app; see {screenshot.with_suffix('.log')}")
            time.sleep(0.3)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(url, timeout=timeout_s * 1000)
                page.get_by_text(expect, exact=False).first.wait_for(timeout=timeout_s * 1000)
                page.wait_for_timeout(2000)  # let the charts below the table draw
                page.screenshot(path=str(screenshot))
                title = page.title()
            finally:
                browser.close()
        return {"url": url, "title": title, "screenshot": str(screenshot), "seconds": time.perf_counter() - t0}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def check_page(page_path: Path, timeout_s: float = 60.0, chromium: str = "/usr/bin/chromium") -> dict[str, Any]:
    """Open an offline report page (file://) in headless Chromium with every non-file request refused:
    what was asked of the network, how many charts drew (SVG inside each chart block) and, for every
    <video>, whether Chromium decoded its first frame."""
    from playwright.sync_api import sync_playwright

    if not Path(chromium).exists():
        raise FileNotFoundError(f"{chromium} not found: install Debian's chromium (apt-get install chromium)")
    page_path = Path(page_path).resolve()
    refused: list[str] = []

    def route(r: Any) -> None:
        if r.request.url.startswith(("file://", "data:")):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(offline=True)
            page = context.new_page()
            page.route("**/*", route)
            page.goto(page_path.as_uri(), timeout=timeout_s * 1000)
            charts = page.evaluate(
                "() => [...document.querySelectorAll('.chart')].map(c => c.querySelectorAll('svg').length)"
            )
            videos = page.evaluate(
                """async (ms) => Promise.all([...document.querySelectorAll('video')].map(v => new Promise(done => {
                    const report = () => done({src: v.getAttribute('src'), ready: v.readyState,
                        duration: v.duration, width: v.videoWidth, error: v.error ? v.error.code : null});
                    if (v.readyState >= 2) return report();
                    v.addEventListener('loadeddata', report, {once: true});
                    v.addEventListener('error', report, {once: true});
                    v.preload = 'auto'; v.load();
                    setTimeout(report, ms);
                })))""",
                timeout_s * 500,
            )
            title = page.title()
        finally:
            browser.close()
    return {
        "title": title,
        "refused_requests": refused,
        "charts": len(charts),
        "charts_drawn": sum(1 for n in charts if n > 0),
        "videos": videos,
        "videos_playable": sum(1 for v in videos if v["ready"] >= 2 and v["width"] > 0 and not v["error"]),
    }
