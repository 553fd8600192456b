"""Drive the app in a real browser (Debian's Chromium through Playwright) and take the README's
screenshots. ``tests/test_browser.py`` and ``bench/ui_speed.py`` use the same helpers.

Usage::

    python scripts/screenshots.py   # docs/img/*.png: built-in dataset, shipped teacher
    python scripts/screenshots.py --full     # tiny settings; also runs Compare and Evaluate
    python scripts/screenshots.py --out /tmp/shots --query "teacher=file&teacher_path=t.pt"
    python scripts/screenshots.py --cifar    # the README's: real CIFAR-10, 10 classes, ResNet-20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
#: Setup of the README's screenshots: the original-pixel CIFAR-10 .npz files and the public
#: ResNet-20 (akamaster), which was trained on original pixels (its own domain).
CIFAR_QUERY = ("ds=npz&root={data}&train_file=cifar10_exact_train_prefix.npz&"
               "test_file=cifar10_exact_test_prefix.npz&teacher=resnet_cifar&teacher_path={data}/"
               "cifar10_resnet20_akamaster.th&teacher_arch=resnet20_cifar")
SHOT_VIEWPORT = {"width": 1400, "height": 1800}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(env: dict | None = None, port: int | None = None, timeout: float = 60.0,
          plain: bool = False):
    """Start the app as ``make run`` does (``python -m studio``: ``streamlit run app.py`` with a
    start-up warm-up) on a free localhost port; yield ``(base_url, started_at)``
    (``time.perf_counter()`` just before the process starts); stop it afterwards. ``plain``:
    ``streamlit run app.py`` without the warm-up."""
    port = port or free_port()
    app = ("streamlit", "run", str(REPO / "app.py")) if plain else ("studio",)
    cmd = [sys.executable, "-m", *app,
           "--server.headless", "true", "--server.address", "127.0.0.1",
           "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=1) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > end:
                raise RuntimeError("streamlit did not start:\n" + (proc.stdout.read() or ""))
            time.sleep(0.1)
        yield base, t0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def browser():
    """A Playwright page in Debian's Chromium (``chromium`` on the PATH).

    Raises:
        FileNotFoundError: no ``chromium`` executable.
    """
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium")
    if exe is None:
        raise FileNotFoundError("chromium not found on PATH (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = b.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            yield page
        finally:
            b.close()


def idle(page, timeout: float = 60.0) -> None:
    """Wait until the app's script has finished running (twice in a row, 250 ms apart, so a
    rerun that a widget triggered has started) and every image has loaded."""
    done = '[data-testid="stApp"][data-test-script-state="notRunning"]'
    for _ in range(2):
        page.wait_for_timeout(250)
        page.locator(done).wait_for(timeout=timeout * 1000)
    page.wait_for_function("[...document.images].every(i => i.complete)")


def goto_page(page, title: str) -> None:
    """Click a page in the sidebar navigation and wait for its title."""
    page.get_by_role("link", name=title, exact=True).first.click()
    page.get_by_role("heading", name=title, exact=True).first.wait_for()
    idle(page)


def slider(page, label: str):
    """The thumb of the slider whose label contains ``label``."""
    return page.locator('[data-testid="stSlider"]').filter(has_text=label).get_by_role("slider")


def set_number(page, label: str, value) -> None:
    """Type ``value`` into the first number input whose label contains ``label``, then wait."""
    box = page.locator('[data-testid="stNumberInput"]').filter(has_text=label).first
    box.locator("input").fill(str(value))
    box.locator("input").press("Enter")
    idle(page)


def metric_value(page, label: str) -> str:
    m = page.locator('[data-testid="stMetric"]').filter(has_text=label)
    return m.locator('[data-testid="stMetricValue"]').inner_text()


#: A job's progress bar: Streamlit's, or the live feed's while a Refine run is shown through it
#: (studio.feed).
PROGRESS = '[data-testid="stProgress"], [data-testid="nrrdd-live-progress"]'

JS_IMAGE_AFTER_CAPTION = """(text) => {
  const cap = document.querySelector('[data-testid="nrrdd-live-caption"]');
  if (cap && cap.innerText.trim().startsWith(text)) {
    const img = document.querySelector('[data-testid="nrrdd-live-picture"]');
    return img && img.src ? img.src : null;
  }
  const blocks = [...document.querySelectorAll('[data-testid="stElementContainer"]')];
  const i = blocks.findIndex(b => b.innerText.trim().startsWith(text));
  if (i < 0 || i + 1 >= blocks.length) return null;
  const img = blocks[i + 1].querySelector('img');
  return img ? img.src : null;
}"""


def image_after(page, caption: str) -> str | None:
    """``src`` of the first image drawn right after the caption starting with ``caption`` (the
    live feed's picture when its caption starts so)."""
    return page.evaluate(JS_IMAGE_AFTER_CAPTION, caption)


def choose_class(page, name: str) -> None:
    """Pick ``name`` in the Setup page's class multiselect."""
    box = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Classes to explore")
    box.locator("input").click()
    page.keyboard.type(name)
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    idle(page)


def watch_live_image(page, changes: int, timeout: float = 60.0) -> list[tuple[float, str]]:
    """Poll the Refine page's first current image until its ``src`` changed ``changes`` times;
    returns ``(time, src)`` of each distinct value seen."""
    seen: list[tuple[float, str]] = []
    end = time.time() + timeout
    while time.time() < end:
        src = image_after(page, "Current images")
        if src and (not seen or seen[-1][1] != src):
            seen.append((time.perf_counter(), src))
            if len(seen) > changes:
                return seen
        page.wait_for_timeout(50)
    raise TimeoutError(f"live image changed {max(0, len(seen) - 1)} times in {timeout} s")


def wait_done(page, timeout: float = 900.0) -> None:
    """Wait until the page's job progress bar says done (or stopped / error)."""
    page.locator(PROGRESS).filter(
        has_text=re.compile(r"^(done|stopped|error)")).wait_for(timeout=timeout * 1000)
    idle(page)


def walk(page, base: str, query: str = "", shots: Path | None = None,
         iterations: int | None = None, full: bool = False,
         class_name: str | None = "circle", finish_refine: bool = False) -> dict:
    """The user walk: Setup (choose ``class_name`` unless None) -> Explorer (move tau) -> Refine (start, watch the
    images change twice, stop, save) -> Compare -> Evaluate -> Runs, with a screenshot of each
    page when ``shots`` is a folder; ``full`` also runs the comparison and an evaluation;
    ``finish_refine`` lets the refinement run to its end instead of stopping it (the README's
    picture then shows refined images, their mask and their change).
    Returns a few observations for tests."""
    out: dict = {}

    def shot(name: str) -> None:
        if shots is not None:
            idle(page)
            shots.mkdir(parents=True, exist_ok=True)
            page.set_viewport_size(SHOT_VIEWPORT)  # Streamlit scrolls inside the page: no full_page
            page.wait_for_timeout(300)
            page.screenshot(path=str(shots / f"{name}.png"))
            page.set_viewport_size(VIEWPORT)

    page.goto(f"{base}/{'?' + query if query else ''}")
    page.get_by_role("heading", name="Setup", exact=True).wait_for()
    idle(page)
    if class_name:
        choose_class(page, class_name)
    out["url_after_class"] = page.url
    shot("setup")

    goto_page(page, "Grad-CAM explorer")
    before = metric_value(page, "Non-critical share")
    thumb = slider(page, "tau")
    thumb.focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    idle(page)
    page.wait_for_function(
        "(b) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => "
        "m.innerText.includes('Non-critical share') && !m.innerText.includes(b))", arg=before)
    out["noncritical"] = (before, metric_value(page, "Non-critical share"))
    shot("explorer")

    goto_page(page, "Refine live")
    if iterations is not None:
        set_number(page, "iterations", iterations)
    page.get_by_role("button", name="Start refinement").click()
    out["live"] = watch_live_image(page, changes=2)
    if finish_refine:
        wait_done(page)
    else:
        page.get_by_role("button", name="Stop run").click()
        page.get_by_text("Stopped on request").wait_for()
    idle(page)
    shot("refine")
    page.get_by_role("button", name="Save run").click()
    page.get_by_text("Saved to").wait_for()

    for title, button in (("Compare", "Run comparison"), ("Evaluate", "Start evaluation"),
                          ("Runs", None)):
        goto_page(page, title)
        if full and button:
            page.get_by_role("button", name=button).click()
            wait_done(page)
        shot(title.lower())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--query", default="", help="URL query of the setup (default: built-in)")
    ap.add_argument("--full", action="store_true",
                    help="tiny settings (NRRDD_STUDIO_TINY=1) and also run Compare and Evaluate")
    ap.add_argument("--cifar", action="store_true",
                    help="real CIFAR-10 (all 10 classes) with the public ResNet-20 from "
                         "../shared/data (the README's screenshots)")
    args = ap.parse_args(argv)
    env = {"NRRDD_STUDIO_TINY": "1"} if args.full else {}
    if args.cifar:
        data = (REPO.parent / "shared" / "data").resolve()
        args.query = "&".join(filter(None, [CIFAR_QUERY.format(data=data), args.query]))
    with tempfile.TemporaryDirectory() as runs, serve({**env, "NRRDD_RUNS": runs}) as (base, _), \
            browser() as page:
        walk(page, base, args.query, shots=args.out,
             iterations=3000 if args.full else 40 if args.cifar else None, full=args.full,
             class_name=None if args.cifar else "circle", finish_refine=args.cifar)
    print(f"screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
