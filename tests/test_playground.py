"""The playground page end to end: Debian's chromium, driven by Playwright, against the
served graph. A user pastes a key, picks a model, generates with previews, and sees the
images, their seeds and the credits; the screenshot is checked for the image and the
credits line. (.ci/run installs chromium with apt-get; Playwright's own browser download
is never used.)"""

from __future__ import annotations

import base64
import io
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.serve

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")

# Records every caption the page shows, so the test sees previews that were later replaced.
RECORD_CAPTIONS = """
window.__captions = [];
new MutationObserver(() => {
  for (const caption of document.querySelectorAll("figcaption span")) {
    const text = caption.textContent;
    if (text && window.__captions[window.__captions.length - 1] !== text) window.__captions.push(text);
  }
}).observe(document.getElementById("results"), { subtree: true, childList: true, characterData: true });
"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs `pip install playwright` (.ci/run)")
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium (`apt-get install chromium`, done by .ci/run)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def data_uri_image(uri: str) -> Image.Image:
    header, b64 = uri.split(",", 1)
    assert header == "data:image/png;base64"
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return image.convert("RGB")


def test_playground_generates_with_previews_and_shows_the_credits(served, browser, tmp_path):
    from playwright.sync_api import expect  # installed: the browser fixture did not skip

    key = served.create_key("10")
    page = browser.new_page(viewport={"width": 1100, "height": 820})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    requested_hosts: set[str] = set()
    page.on("request", lambda request: requested_hosts.add(request.url.split("/")[2]))

    page.goto(f"{served.base_url}/playground")
    page.fill("#api-key", key)
    page.click("#save-key")
    page.wait_for_selector("#model option[value='tiny-sdxl']", state="attached")
    # Kept for this tab only: nothing in localStorage unless "Remember key" is ticked.
    assert page.evaluate("sessionStorage.getItem('imagegen.apiKey')") == key
    assert page.evaluate("localStorage.getItem('imagegen.apiKey')") is None
    page.select_option("#model", "tiny-sdxl")
    page.fill("#prompt", "a small red apple on a white background")
    page.fill("#size", "128x128")
    page.fill("#n", "2")
    page.fill("#num_inference_steps", "12")
    page.fill("#seed", "5")
    page.select_option("#partial_images", "3")
    page.evaluate(RECORD_CAPTIONS)
    page.click("#generate")
    # (Waits for this text: the status may still show an earlier run's right after the click.)
    expect(page.locator("#status")).to_have_text("Done: 2 images.", timeout=60_000)
    assert page.text_content("#credits") == "Credits charged: 2 · remaining: 8"
    captions = page.evaluate("window.__captions")
    assert any(text.startswith("preview 1, step ") for text in captions), captions
    assert [page.text_content(f"figure[data-index='{i}'] span") for i in (0, 1)] == [
        "seed 5 · 128x128",
        "seed 6 · 128x128",
    ]
    assert page.get_attribute("figure[data-index='0'] a", "download") == "imagegen-5.png"

    # The page shows the image the API gives for the same request.
    shown = data_uri_image(page.get_attribute("figure[data-index='0'] img", "src"))
    plain = served.client(served.create_key("5")).images.generate(
        model="tiny-sdxl",
        prompt="a small red apple on a white background",
        size="128x128",
        extra_body={"seed": 5, "num_inference_steps": 12},
    )
    expected = Image.open(io.BytesIO(base64.b64decode(plain.data[0].b64_json))).convert("RGB")
    assert np.abs(np.asarray(shown, np.int16) - np.asarray(expected, np.int16)).max() <= 1

    # The screenshot: the first image drawn where the page put it, and the credits line.
    shot_path = tmp_path / "playground.png"
    page.screenshot(path=str(shot_path))
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot_path, os.environ["PLAYGROUND_SCREENSHOT"])
    shot = Image.open(shot_path).convert("RGB")
    box = page.locator("figure[data-index='0'] img").bounding_box()
    drawn = shot.crop(
        (round(box["x"]), round(box["y"]), round(box["x"] + box["width"]), round(box["y"] + box["height"]))
    )
    scaled = expected.resize(drawn.size, Image.NEAREST)
    assert np.abs(np.asarray(drawn, np.int16) - np.asarray(scaled, np.int16)).mean() < 8
    credits_box = page.locator("#credits").bounding_box()
    credits = shot.crop(
        (
            round(credits_box["x"]),
            round(credits_box["y"]),
            round(credits_box["x"] + credits_box["width"]),
            round(credits_box["y"] + credits_box["height"]),
        )
    )
    assert (np.asarray(credits.convert("L")) < 100).sum() > 100, "the credits line is not drawn"

    # Image-to-image: an input image from the file picker, with a strength.
    source = io.BytesIO()
    Image.new("RGB", (128, 128), (30, 160, 220)).save(source, format="PNG")
    page.set_input_files("#image", files=[{"name": "blue.png", "mimeType": "image/png", "buffer": source.getvalue()}])
    page.fill("#strength", "0.5")
    page.fill("#n", "1")
    page.fill("#seed", "9")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("Done: 1 image.", timeout=60_000)
    assert page.text_content("#credits") == "Credits charged: 1 · remaining: 7"
    shown = data_uri_image(page.get_attribute("figure[data-index='0'] img", "src"))
    plain = served.client(served.create_key("5")).images.generate(
        model="tiny-sdxl",
        prompt="a small red apple on a white background",
        size="128x128",
        extra_body={
            "seed": 9,
            "num_inference_steps": 12,
            "strength": 0.5,
            "image": "data:image/png;base64," + base64.b64encode(source.getvalue()).decode(),
        },
    )
    expected = Image.open(io.BytesIO(base64.b64decode(plain.data[0].b64_json))).convert("RGB")
    assert np.abs(np.asarray(shown, np.int16) - np.asarray(expected, np.int16)).max() <= 1

    usage = httpx.get(f"{served.base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert float(usage["balance"]) == 7
    assert errors == []
    assert requested_hosts == {served.base_url.split("/")[2]}, "the page fetched from another host"
    page.close()
