"""The Swagger UI at /api as a new user meets it: headless Chromium, driven by Selenium, against a real
`deepaas-run` on loopback. The page loads without errors, and predict runs from the UI with an image
file (Try it out, the file input, Execute), its JSON answer read from the page."""

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from tests.deepaas_harness import deepaas_run
from tests.helpers import copy_roots, encode, seed_photo

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


WAIT_S = 120
"""The longest any step may take: generous, for a loaded 2-core machine; a step ends as soon as it can."""

PREDICT_BLOCK = "operations-models-post_v2_models_seeds_tf_predict_"
"""The id the Swagger UI gives the predict operation's block."""


def test_the_browser_is_installed():
    """Missing is a failure, not a skip: `make test` installs Debian's chromium and chromium-driver."""
    assert CHROMIUM and CHROMEDRIVER, "chromium or chromedriver is not on PATH: run `make system`"


@pytest.fixture(scope="module")
def server(tmp_path_factory, session_roots, tiny_run):
    """A real deepaas-run over copies of the tiny dataset and run; yields (base URL, roots)."""
    base = tmp_path_factory.mktemp("browser")
    roots = copy_roots(session_roots, base)
    env = {DATA_ENV: str(roots.data), MODELS_ENV: str(roots.models)}
    with deepaas_run(env, base / "server.log") as url:
        yield url, roots


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,3000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(server, browser):
    """The Swagger UI freshly loaded, its console read up to now; yields the browser."""
    url, _ = server
    browser.get(f"{url}/api")
    _wait(browser, lambda driver: driver.find_elements(By.ID, PREDICT_BLOCK))
    return browser


def test_the_page_loads_our_spec_without_errors(page, server):
    url, _ = server
    blocks = [block.get_attribute("id") for block in page.find_elements(By.CSS_SELECTOR, ".opblock")]
    assert PREDICT_BLOCK in blocks
    assert "operations-models-post_v2_models_seeds_tf_train_" in blocks
    assert page.find_elements(By.CSS_SELECTOR, ".errors-wrapper") == [], "the UI found errors in the spec"
    # DEEPaaS' description shows its logo from the internet, which the tests do not reach.
    errors = [
        entry
        for entry in page.get_log("browser")
        if entry["level"] == "SEVERE" and (entry["source"] != "network" or url in entry["message"])
    ]
    assert errors == []


def test_predict_from_the_ui_with_an_image_file(page, server):
    _, roots = server
    predict = _try_out_predict(page)
    _choose_file(predict, seed_photo(roots))
    status, body = _execute(page, predict)
    assert status == "200", body.text
    answer = _json(body)
    assert answer["labels"], answer
    assert answer["labels"] == [species["label"] for species in answer["results"][0]["species"]]
    classes = (roots.data / "tiny" / "dataset_files" / "classes.txt").read_text().splitlines()
    assert set(answer["labels"]) <= set(classes)


def test_predict_from_the_ui_with_a_data_uri_over_8_kb(page):
    """The spec put `data` in the query string, so the UI sent the data URI in the URL, and aiohttp
    answered one over its 8 KB limit with a plain-text 400: it goes in the form body now."""
    noise = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    uri = "data:image/png;base64," + base64.b64encode(encode(noise, "PNG")).decode()
    assert len(uri) > 8192
    predict = _try_out_predict(page)
    _type(page, predict.find_element(By.CSS_SELECTOR, "tr[data-param-name='data'] input"), uri)
    status, body = _execute(page, predict)
    assert status == "200", body.text
    assert [result["image"] for result in _json(body)["results"]] == ["data URI 1"]


def test_predict_without_a_file_says_what_is_missing(page):
    """The UI sends an empty multipart body with no boundary; DEEPaaS answered 400 "boundary missed"."""
    status, body = _execute(page, _try_out_predict(page))
    assert status == "422", body.text
    assert _json(body) == {
        "message": "image: no image: upload one (image), or give urls or data",
        "field": "image",
    }


def test_the_response_content_type_selector_asks_for_the_heatmap(page, server):
    _, roots = server
    predict = _try_out_predict(page)
    accept = Select(predict.find_element(By.CSS_SELECTOR, "tr[data-param-name='accept'] select"))
    assert accept.first_selected_option.text == "--", "the accept field would override the selector"
    _choose_file(predict, seed_photo(roots))
    selector = Select(predict.find_element(By.CSS_SELECTOR, "select[aria-label='Response content type']"))
    selector.select_by_visible_text("image/png")
    status, body = _execute(page, predict)
    assert status == "200", body.text
    assert "content-type: image/png" in body.text
    assert body.find_elements(By.TAG_NAME, "img"), "no image in the answer"


def _try_out_predict(browser) -> WebElement:
    """The predict block, opened, in "Try it out" mode."""
    block = browser.find_element(By.ID, PREDICT_BLOCK)
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    _wait(browser, lambda _: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    _wait(browser, lambda _: block.find_elements(By.CSS_SELECTOR, ".execute"))
    return block


def _choose_file(block: WebElement, path: Path) -> None:
    block.find_element(By.CSS_SELECTOR, "tr[data-param-name='image'] input[type=file]").send_keys(str(path))


def _type(browser, field: WebElement, text: str) -> None:
    """`text` in an input of the UI, as if typed (send_keys takes half a minute for 10 KB): all but
    its last character set by script, the last one typed, whose input event the UI reads the whole
    value from."""
    browser.execute_script("arguments[0].value = arguments[1];", field, text[:-1])
    field.send_keys(text[-1])


def _execute(browser, block: WebElement) -> tuple[str, WebElement]:
    """Clicks Execute and waits for the answer: its status code, and the element of its body."""
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    live = ".live-responses-table .response"
    _wait(browser, lambda _: block.find_elements(By.CSS_SELECTOR, f"{live} .response-col_status"))
    status = block.find_element(By.CSS_SELECTOR, f"{live} .response-col_status").text.split()[0]
    return status, block.find_element(By.CSS_SELECTOR, f"{live} .response-col_description")


def _json(body: WebElement):
    """The JSON answer shown in a response's body."""
    return json.loads(body.find_element(By.CSS_SELECTOR, ".highlight-code pre").get_attribute("textContent"))


def _wait(browser, condition):
    return WebDriverWait(browser, WAIT_S).until(condition)
