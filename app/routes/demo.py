"""The demo page at `/`: plain HTML, CSS and JavaScript files, no build step.

Its URLs are relative to the page's `<base>`, which names the root path that the server is behind
(VIT_ROOT_PATH), so that the page works under a proxy's path prefix too.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
BASE = '<base href="/">'

router = APIRouter(include_in_schema=False)


@cache
def page_template() -> str:
    return (STATIC_DIR / "index.html").read_text()


@router.get("/")
async def demo_page(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return HTMLResponse(page_template().replace(BASE, f'<base href="{html.escape(root)}/">'))
