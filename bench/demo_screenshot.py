"""Drive the demo page in headless Chromium and save the README's screenshot: ``python -m bench.demo_screenshot``.

Uses Debian's `chromium` package through Playwright (no browser download).
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from bench.serving import running_server

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "demo.png"
VIEWPORT = {"width": 1000, "height": 640}


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


HEATMAP_LOADED = "() => { const image = document.getElementById('heatmap'); return image.complete && image.naturalWidth > 0; }"


def analyse(page: Page, base_url: str, image: Path) -> None:
    """Open the page, upload `image`, and wait until the top 5 and the heatmap are on screen."""
    page.goto(f"{base_url}/")
    page.wait_for_function("document.getElementById('method').options.length > 0")  # choices loaded
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#results:not([hidden])")
    page.wait_for_function(HEATMAP_LOADED)


def main() -> None:
    with running_server({"VIT_DEVICE": "cpu"}) as server, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport=VIEWPORT)
        analyse(page, server.base_url, ROOT / "examples" / "ankle-boot.png")
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
    print(f"wrote {SCREENSHOT}")


if __name__ == "__main__":
    main()
