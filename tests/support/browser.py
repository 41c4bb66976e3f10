"""The demo page driven in Debian's Chromium through Playwright (no browser download)."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1000, "height": 640}
HEATMAP_LOADED = (
    "() => { const image = document.getElementById('heatmap'); return image.complete && image.naturalWidth > 0; }"
)


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


def analyse(page: Page, base_url: str, image: Path) -> None:
    """Open the page, upload `image`, and wait until the top 5 and the heatmap are on screen."""
    page.goto(f"{base_url}/")
    page.wait_for_function("document.getElementById('method').options.length > 0")  # choices loaded
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#results:not([hidden])")
    page.wait_for_function(HEATMAP_LOADED)
