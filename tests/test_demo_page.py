"""The demo page at /, used in headless Chromium (Debian's package) against real uvicorn."""

import io
import shutil
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from model.images import READS_HEIF
from tests.support.browser import HEATMAP_LOADED, VIEWPORT, analyse, launch
from tests.support.images import HEIC_FILES, image_bytes
from tests.support.proxy import prefix_proxy
from tests.support.server import running_server


@pytest.fixture
def page():
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser.new_page(viewport=VIEWPORT)
        browser.close()


def test_upload_shows_the_label_bars_and_a_heatmap_that_follows_the_choices(server, page, fashion_test, tmp_path):
    index = 1  # a Pullover the shipped model gets right
    image = tmp_path / "pullover.png"
    image.write_bytes(image_bytes(fashion_test.images[index, 0].numpy()))
    analyse(page, server.base_url, image)

    labels = page.locator("#predictions .label").all_inner_texts()
    assert len(labels) == 5 and labels[0] == fashion_test.classes[int(fashion_test.labels[index])]
    widths = page.locator("#predictions .bar span").evaluate_all("bars => bars.map(bar => parseFloat(bar.style.width))")
    assert widths == sorted(widths, reverse=True) and widths[0] > 50
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") == 28  # the upload's own size
    assert "vit-tiny-fashion-mnist" in page.inner_text("#model-name")
    assert page.locator("#method option").all_inner_texts() == ["raw", "last", "rollout", "gradient", "threshold"]

    first_heatmap = page.get_attribute("#heatmap", "src")
    with page.expect_response(
        lambda response: "method=gradient" in response.url and "colormap=inferno" in response.url
    ):
        page.select_option("#colormap", "inferno")
        page.select_option("#method", "gradient")
    page.wait_for_function("document.getElementById('heatmap-caption').textContent === 'attention: gradient'")
    page.wait_for_function(HEATMAP_LOADED)
    assert page.get_attribute("#heatmap", "src") != first_heatmap

    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    with Image.open(screenshot) as picture:
        assert picture.format == "PNG" and picture.width == VIEWPORT["width"]


DELAY_GRADIENT_MAPS = """
const realFetch = window.fetch;
window.fetch = async (url, options) => {
  const response = await realFetch(url, options);
  if (String(url).includes("method=gradient")) await new Promise((resolve) => setTimeout(resolve, 1500));
  return response;
};
"""
PIXELS_OF = """(id) => {
  const image = document.getElementById(id);
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [image.naturalWidth, image.naturalHeight];
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
}"""


def pixels_of(page, id: str) -> np.ndarray:
    """The RGB pixels of the page's image `id`, as the browser decoded them: (H, W, 3)."""
    width, height = page.evaluate(
        f"[document.getElementById('{id}').naturalWidth, document.getElementById('{id}').naturalHeight]"
    )
    return np.array(page.evaluate(PIXELS_OF, id), dtype=float).reshape(height, width, 4)[..., :3]


def test_a_heatmap_that_arrives_after_a_newer_choice_is_not_shown_under_its_name(server, page, fashion_test, tmp_path):
    image = tmp_path / "pullover.png"
    image.write_bytes(image_bytes(fashion_test.images[1, 0].numpy()))
    page.add_init_script(DELAY_GRADIENT_MAPS)  # a slow answer, as a busy server gives
    analyse(page, server.base_url, image)
    with page.expect_response(lambda response: "method=gradient" in response.url):
        page.select_option("#method", "gradient")
        page.select_option("#method", "last")
    page.wait_for_timeout(2000)  # the gradient map is read 1.5 s after its answer
    assert page.inner_text("#heatmap-caption") == "attention: last"
    shown = pixels_of(page, "heatmap")
    distance = {}
    for method in ("last", "gradient"):
        with open(image, "rb") as file:
            answer = httpx.post(f"{server.base_url}/attention", params={"method": method}, files={"file": file})
        distance[method] = np.abs(shown - np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))).mean()
    assert distance["last"] < 1 < distance["gradient"], (
        distance
    )  # the gradient map used to replace it, captioned "last"


def test_a_class_clicked_in_the_top_5_shows_its_gradient_map_until_another_method_is_chosen(
    server, page, fashion_test, tmp_path
):
    image = tmp_path / "pullover.png"
    image.write_bytes(image_bytes(fashion_test.images[1, 0].numpy()))
    analyse(page, server.base_url, image)
    third = page.locator("#predictions .label").nth(2)
    label = third.inner_text()
    index = fashion_test.classes.index(label)  # asked for by index: a class named "7" would be read as one
    asked = lambda response: parse_qs(urlsplit(response.url).query)
    with page.expect_response(lambda response: asked(response).get("target") == [str(index)]):
        third.click()
    page.wait_for_function(
        f"document.getElementById('heatmap-caption').textContent === 'attention: gradient, for {label}'"
    )
    page.wait_for_function(HEATMAP_LOADED)
    assert page.input_value("#method") == "gradient"
    assert page.locator("#predictions .label[aria-pressed=true]").all_inner_texts() == [label]
    shown = pixels_of(page, "heatmap")
    distance = {}
    for target in (label, None):  # the clicked class's map, not the top-1's
        params = {"method": "gradient"} | ({"target": label} if target else {})
        with open(image, "rb") as file:
            answer = httpx.post(f"{server.base_url}/attention", params=params, files={"file": file})
        distance[target] = np.abs(shown - np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))).mean()
    assert distance[label] < 1 < distance[None], distance

    with page.expect_response(lambda response: "method=rollout" in response.url):
        page.select_option("#method", "rollout")
    page.wait_for_function("document.getElementById('heatmap-caption').textContent === 'attention: rollout'")
    assert page.locator("#predictions .label[aria-pressed=true]").count() == 0


@pytest.mark.parametrize("kind", ["png", "tiff", "heic"])
def test_an_upload_the_browser_cannot_show_is_previewed_as_the_server_decoded_it(server, page, tmp_path, kind):
    if kind == "heic" and not READS_HEIF:
        pytest.skip("pi-heif is not installed, so the server refuses HEIC")
    picture = np.zeros((30, 40, 3), np.uint8)
    picture[:, :, 0] = np.arange(40) * 255 // 39  # red grows from left to right
    image = tmp_path / f"upload.{kind}"
    if kind == "heic":  # stored with red growing left to right, and turned by its irot box: downwards
        shutil.copy(HEIC_FILES / "turned.heic", image)
    else:
        image.write_bytes(image_bytes(picture, kind.upper()))
    asked = []
    page.on("request", lambda request: asked.append(request.url))
    analyse(page, server.base_url, image)
    page.wait_for_function("document.getElementById('preview').complete")
    red = pixels_of(page, "preview")[..., 0]
    size, corner, right, bottom = [red.shape[1], red.shape[0]], red[0, 0], red[0, -1], red[-1, 0]
    drawn = [url for url in asked if "alpha=0" in url]  # the server's drawing, asked for where the browser fails
    if kind == "heic":
        assert size == [200, 300] and bottom - corner > 200 and abs(right - corner) < 20 and len(drawn) == 1
    else:  # Chromium shows PNG itself, and showed no TIFF: the preview was an empty frame
        assert size == [40, 30] and right - corner > 200 and abs(bottom - corner) < 20
        assert len(drawn) == (kind == "tiff")


def test_a_file_that_is_not_an_image_shows_the_servers_reason(server, page, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image at all")
    page.goto(f"{server.base_url}/")
    page.set_input_files("#file-input", str(notes))
    page.wait_for_selector("#status.error")
    assert "notes.png: not an image" in page.inner_text("#status")
    assert page.locator("#results").is_hidden()


def test_an_image_dragged_from_another_page_which_arrives_as_an_address_is_told_to_be_saved_first(server, page):
    page.goto(f"{server.base_url}/")
    page.evaluate("""() => {
      const dropped = new DataTransfer();  // what a browser drops for an image dragged out of a web page
      dropped.setData("text/uri-list", "https://example.com/boot.png");
      document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", { dataTransfer: dropped }));
    }""")
    page.wait_for_selector("#status.error")  # nothing happened at all
    assert page.inner_text("#status").startswith("this drop holds no file, only text or an address")
    assert page.locator("#results").is_hidden()


def test_a_phone_is_told_to_tap_and_a_computer_to_drop_or_click(server, fashion_test, tmp_path):
    image = tmp_path / "boot.png"
    image.write_bytes(image_bytes(fashion_test.images[0, 0].numpy()))
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            for touch, drop_zone, hint in (
                (False, "Drop an image here, or click to choose one", "Click a class to see what speaks for it."),
                (True, "Tap to choose a photo, or to take one", "Tap a class to see what speaks for it."),
            ):
                context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=touch, is_mobile=touch)
                page = context.new_page()
                analyse(page, server.base_url, image)
                assert page.inner_text("#drop-zone").strip() == drop_zone
                assert " ".join(page.inner_text(".predictions .hint").split()) == hint
                assert page.evaluate("document.documentElement.scrollWidth") == 390  # nothing wider than a phone
                context.close()
        finally:
            browser.close()


def test_a_keyboard_reaches_the_drop_zone_and_sees_its_focus(server, page):
    page.goto(f"{server.base_url}/")
    page.wait_for_function("document.getElementById('method').options.length > 0")
    outline = "getComputedStyle(document.getElementById('drop-zone')).outlineStyle"
    assert page.evaluate(outline) == "none"
    page.keyboard.press("Tab")  # the page's first stop: the zone's hidden file input, which showed no focus at all
    assert page.evaluate("document.activeElement.id") == "file-input" and page.evaluate(outline) == "solid"


def test_a_server_with_an_api_key_asks_for_it_and_the_page_classifies_once_it_is_given(page, fashion_test, tmp_path):
    image = tmp_path / "pullover.png"
    image.write_bytes(image_bytes(fashion_test.images[1, 0].numpy()))
    with running_server({"VIT_DEVICE": "cpu", "VIT_API_KEY": "s3cret"}) as server:
        page.goto(f"{server.base_url}/")
        assert page.locator("#key-form").is_hidden()  # until the server asks
        page.wait_for_function("document.getElementById('method').options.length > 0")
        page.set_input_files("#file-input", str(image))
        page.wait_for_selector("#status.error")
        assert page.inner_text("#status") == "this server asks for an API key"
        assert page.locator("#key-form").is_visible() and page.locator("#results").is_hidden()

        page.fill("#api-key", "not-the-key")
        page.press("#api-key", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('refused')")
        assert page.inner_text("#status") == "the server refused this API key"

        page.fill("#api-key", "s3cret")
        page.press("#api-key", "Enter")
        page.wait_for_selector("#results:not([hidden])")
        page.wait_for_function(HEATMAP_LOADED)
        labels = page.locator("#predictions .label").all_inner_texts()
        assert labels[0] == fashion_test.classes[int(fashion_test.labels[1])]
        assert page.inner_text("#status") == "pullover.png"


def test_the_page_works_behind_a_proxy_that_serves_it_under_a_path_prefix(page, fashion_test, tmp_path):
    image = tmp_path / "pullover.png"
    image.write_bytes(image_bytes(fashion_test.images[1, 0].numpy()))
    env = {"VIT_DEVICE": "cpu", "VIT_ROOT_PATH": "/vit", "VIT_WORKERS": "1"}
    with running_server(env, app=None) as server, prefix_proxy(server.base_url, "/vit") as proxied:
        analyse(page, proxied, image)  # a URL outside /vit/ (the server's own /predict, say) would get 404
        labels = page.locator("#predictions .label").all_inner_texts()
        assert labels[0] == fashion_test.classes[int(fashion_test.labels[1])]
        assert "vit-tiny-fashion-mnist" in page.inner_text("#model-name")
        assert page.evaluate("document.querySelector('footer a').href") == f"{proxied}/docs"
