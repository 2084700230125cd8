"""jedi-app in a real browser: headless Chromium (Debian's package) driven by Playwright against the app
served on localhost from the tiny exported pipeline. Skipped, saying why, without chromium or playwright;
.ci/run installs both."""
import io
import os
import shutil
import zipfile

import numpy as np
import pytest
from helpers.app_server import answers, running_app
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright "
                                 "(.ci/run installs it)")
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and os.path.isfile(p)), None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium to drive: apt-get install "
                                                   "chromium (Debian's package; .ci/run installs it)")]
DREAMBENCH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "dreambench", "can")
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(pipe_dir, tmp_path_factory):
    """jedi-app on a free localhost port: yields its URL; stopped (by its pid) afterwards."""
    with running_app(pipe_dir, tmp_path_factory.mktemp("app"), "--max-refs", "4") as (url, _proc, _log):
        yield url


@pytest.fixture
def photos(tmp_path):
    """Two reference photos: DreamBench's when ../shared has them, else two made-up ones."""
    if os.path.isdir(DREAMBENCH):
        return [os.path.join(DREAMBENCH, f) for f in sorted(os.listdir(DREAMBENCH))[:2]]
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"photo{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (96, 128, 3), np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def fill_slider(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_upload_generate_download_and_a_bad_upload(page, server, photos, tmp_path):
    expect = playwright.expect
    assert "JointUNet2DConditionModel" in page.locator("#model-info").inner_text()  # what is loaded
    page.locator("#refs input[type=file]").set_input_files(photos)
    expect(page.locator("#seen img")).to_have_count(2)  # the references as the model will see them
    page.locator("#prompts textarea").fill("a photo of a can on the beach\na photo of a can in the snow")
    fill_slider(page, "steps", 2)
    page.locator("#generate").click()
    expect(page.locator("#results img")).to_have_count(2)
    expect(page.locator("#status")).to_contain_text("2 images from 2 reference(s)")
    expect(page.locator("#status")).to_contain_text("2 steps")
    expect(page.locator("#used img")).to_have_count(2)
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    link = page.locator("#download a[download]")
    expect(link).to_have_attribute("download", "jedi-app-seed0.zip")
    with zipfile.ZipFile(io.BytesIO(page.request.get(link.get_attribute("href")).body())) as z:
        assert {"00_00.png", "01_00.png", "settings.json", "grid.png"} <= set(z.namelist())

    (tmp_path / "notes.txt").write_text("these are my notes, not a photo")
    page.locator("#refs input[type=file]").set_input_files([str(tmp_path / "notes.txt")])
    expect(page.get_by_text("notes.txt is not a readable image")).to_be_visible()
    page.wait_for_timeout(500)  # the toast slides in
    page.screenshot(path=str(tmp_path / "bad_upload.png"), full_page=True)

    assert answers(server)  # the server is still up, and still samples
    page.reload()
    page.locator("#refs input[type=file]").set_input_files(photos[:1])
    page.locator("#prompts textarea").fill("a photo of a can in the city")
    fill_slider(page, "steps", 2)
    page.locator("#seed input, #seed textarea").fill("random")
    page.locator("#generate").click()
    expect(page.locator("#status")).to_contain_text("1 image from 1 reference(s)")
    expect(page.locator("#results img")).to_have_count(1)
