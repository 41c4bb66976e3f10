"""/docs and /redoc in headless Chromium with every request off the server blocked: nothing they need comes
from a CDN. (ReDoc's sidebar credit asks cdn.redoc.ly for its logo, an image the page works without.)"""

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import sync_playwright

from tests.support.browser import VIEWPORT, launch


@pytest.fixture
def offline_page(server):
    """A page that may load only from the server; every other request is aborted and recorded by type."""
    blocked: list[tuple[str, str]] = []
    allowed = urlsplit(server.base_url).netloc

    def only_the_server(route):
        if urlsplit(route.request.url).netloc == allowed:
            route.continue_()
        else:
            blocked.append((route.request.resource_type, route.request.url))
            route.abort()

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport=VIEWPORT)
        page.route("**/*", only_the_server)
        yield page, blocked
        browser.close()


def test_swagger_ui_lists_every_operation_without_the_network(server, offline_page):
    page, blocked = offline_page
    page.goto(f"{server.base_url}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/predict", "/attention", "/health/ready", "/v2/models/{model_name}/infer"} <= set(paths)
    assert blocked == []


def test_redoc_renders_the_operations_without_the_network(server, offline_page):
    page, blocked = offline_page
    page.goto(f"{server.base_url}/redoc")
    page.wait_for_selector("h2:has-text('Predict')", timeout=15_000)
    assert page.locator("h2").count() >= 5  # one heading per operation
    assert [url for kind, url in blocked if kind != "image"] == []
