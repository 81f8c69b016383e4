"""The studio page of `bonsai serve` in a real headless browser: Debian's chromium and chromedriver through
selenium, against a live server on a loopback port (installed in CI by `.ci/run`)."""

import base64
import io
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("selenium", reason="selenium is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import bonsai  # noqa: E402
from bonsai import testing  # noqa: E402
from bonsai.serve.app import ServeConfig, create_app  # noqa: E402
from bonsai.serve.server import running  # noqa: E402

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900")
WAIT_S = 60
TOL = 2


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    repo = testing.write_repo(tmp_path_factory.mktemp("studio") / "tiny-ternary-gemlite", layout="gemlite", seed=0)
    return bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32, keep_text_encoder=True)


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def fill(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def test_studio_renders_into_the_gallery(pipe, browser, tmp_path):
    app = create_app(ServeConfig(model_name="tiny"), lambda: pipe)
    with running(app) as (url, _server):
        browser.get(url + "/")
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(lambda d: d.find_element(By.ID, "health").get_attribute("data-state") == "ok")
        assert "torch" in browser.find_element(By.ID, "health").text

        fill(browser, "width", 64)
        fill(browser, "height", 48)
        fill(browser, "steps", 6)
        fill(browser, "seed", 1234)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys("a bonsai tree in a clay pot")
        prompt.send_keys(Keys.ENTER)  # Enter generates

        card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure"))[0]
        wait.until(lambda d: d.execute_script("return document.querySelector('#gallery img').naturalWidth") == 64)
        # Live progress: one SSE event per step reached the page and moved the bar.
        bar = browser.find_element(By.ID, "progress")
        assert bar.get_attribute("data-events") == "6"
        assert bar.get_attribute("value") == bar.get_attribute("max") == "6"
        # The image's metadata, read from the page.
        seed = int(card.find_element(By.CSS_SELECTOR, "dd.seed").text)
        assert seed == 1234 and card.get_attribute("data-seed") == "1234"
        assert card.find_element(By.CSS_SELECTOR, "dd.size").text == "64×48"
        assert card.find_element(By.CSS_SELECTOR, ".prompt").text == "a bonsai tree in a clay pot"
        assert browser.find_element(By.ID, "seed").get_attribute("value") != "1234"  # rerolled for the next one
        assert "done in" in browser.find_element(By.ID, "status").text

        # The download link holds the PNG the server rendered: the pixels of a plain Pipeline render.
        link = card.find_element(By.CSS_SELECTOR, "a.download")
        assert link.get_attribute("download") == "bonsai-1234.png"
        b64 = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch(arguments[0]).then((r) => r.arrayBuffer()).then((buf) => {
              let s = ""; for (const b of new Uint8Array(buf)) s += String.fromCharCode(b); done(btoa(s)); });
        """, link.get_attribute("href"))
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert bonsai.metadata(img)["seed"] == 1234
        ref = pipe("a bonsai tree in a clay pot", width=64, height=48, steps=6, seed=1234, progress=False).image
        assert np.abs(np.asarray(img.convert("RGB"), np.int16) - np.asarray(ref, np.int16)).max() <= TOL

        # A bad size is refused by the server and the page names the field (Ctrl+Enter generates too).
        fill(browser, "width", 100)
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)
        wait.until(lambda d: "multiple of 16" in d.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "width").get_attribute("aria-invalid") == "true"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 1

        shot = tmp_path / "studio.png"
        browser.save_screenshot(str(shot))
        print(f"studio screenshot: {shot}")
        assert Image.open(shot).size[0] > 0
        assert httpx.get(url + "/healthz").status_code == 200
