"""Drive the demo page in headless Chromium and save the README's screenshot: ``python -m bench.demo_screenshot``.

Uses Debian's `chromium` package through Playwright (no browser download).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.support.browser import VIEWPORT, analyse, launch
from tests.support.server import running_server

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "demo.png"


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with running_server({"VIT_DEVICE": "cpu"}) as server, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport=VIEWPORT)
        analyse(page, server.base_url, ROOT / "examples" / "ankle-boot.png")
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
    print(f"wrote {SCREENSHOT}")


if __name__ == "__main__":
    main()
