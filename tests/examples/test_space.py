"""The Gradio demo (examples/space/app.py) on 127.0.0.1, driven in Debian's headless Chromium: what it shows is what
the `reward-scoring` pipeline computes here, on the same tiny random checkpoint."""

import math
import os
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, pipeline

from tests.serving_utils import free_port, running_server
from tests.utils import tiny_armorm, tiny_llama_config


APP = Path(__file__).resolve().parents[2] / "examples" / "space" / "app.py"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OBJECTIVES = ["helpfulness", "correctness", "safety", "verbosity"]
PROMPT = "How do I keep basil fresh?"
ANSWER_A = "Trim the stems and keep it in a glass of water on the counter, loosely covered."
ANSWER_B = "Put it in the freezer."

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian's chromium and chromium-driver are not installed and could not be (`make browser` runs apt-get)",
)


@pytest.fixture(scope="module")
def checkpoint(smollm2_tokenizer_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    text_config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = tiny_armorm(text_config, tokenizer=tokenizer, objective_names=OBJECTIVES, seed=3)
    folder = tmp_path_factory.mktemp("space_checkpoint")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def app_url(checkpoint, tmp_path_factory):
    port = free_port()
    env = {
        "ARMORM_MODEL": checkpoint,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path_factory.mktemp("space_log") / "app.log"
    with running_server([sys.executable, str(APP)], port, log, timeout=180, env=env, route="/"):
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below, selenium-manager is never called
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return pipeline("reward-scoring", model=checkpoint)


def conversation(answer: str) -> list[dict]:
    return [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer}]


def submit(browser, url: str, answer_a: str, answer_b: str = ""):
    """Open the app, type the prompt and answers, press Score; returns the waiting helper."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 120)
    for elem_id, text in (("prompt", PROMPT), ("answer-a", answer_a), ("answer-b", answer_b)):
        box = wait.until(lambda d, elem_id=elem_id: d.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea"))
        box.send_keys(text)
    browser.find_element(By.ID, "score-button").click()
    return wait


def shown_summary(wait) -> str:
    """The summary line, once the app has answered (it is empty until then)."""
    from selenium.webdriver.common.by import By

    return wait.until(lambda d: d.find_element(By.ID, "summary").text.strip())


def shown_number(browser, elem_id: str) -> float:
    from selenium.webdriver.common.by import By

    return float(browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input").get_attribute("value"))


def shown_chart(wait, elem_id: str):
    """The chart's <img>, once the browser has decoded it (a picture with a width, not a placeholder)."""
    from selenium.webdriver.common.by import By

    def loaded(driver):
        for image in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"):
            if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image):
                return image
        return None

    return wait.until(loaded)


def assert_same_score(shown: float, expected: float):
    assert math.isclose(shown, expected, rel_tol=1e-5, abs_tol=1e-6), (shown, expected)


def test_one_answer_shows_the_pipelines_score_and_its_chart(app_url, browser, pipe):
    from selenium.webdriver.common.by import By

    expected = pipe.explain(conversation(ANSWER_A))
    wait = submit(browser, app_url, ANSWER_A)
    summary = shown_summary(wait)
    assert_same_score(shown_number(browser, "score-a"), expected.score)
    image = shown_chart(wait, "chart-a")
    assert image.get_attribute("src").startswith("data:image/png")
    assert browser.execute_script("return arguments[0].naturalWidth", image) > 300
    # The gating weights: one row per objective, the pipeline's g.
    table = browser.find_element(By.ID, "gating").text
    for name, weight in expected.gating.items():
        assert name in table
        assert any(math.isclose(float(cell), weight, rel_tol=1e-3, abs_tol=1e-4) for cell in numbers(table)), (
            name,
            weight,
            table,
        )
    assert f"Score: {expected.score:+.3f}" in summary


def numbers(text: str) -> list[float]:
    out = []
    for token in text.split():
        try:
            out.append(float(token))
        except ValueError:
            pass
    return out


def test_two_answers_show_both_scores_and_the_preferred_one(app_url, browser, pipe):

    expected = pipe.compare(PROMPT, ANSWER_A, ANSWER_B)
    wait = submit(browser, app_url, ANSWER_A, ANSWER_B)
    summary = shown_summary(wait)
    assert_same_score(shown_number(browser, "score-a"), expected["scores"][0])
    assert_same_score(shown_number(browser, "score-b"), expected["scores"][1])
    shown_chart(wait, "chart-a")
    shown_chart(wait, "chart-b")
    assert f"Preferred: Answer {expected['preferred'].upper()}" in summary
    assert f"{expected['margin']:+.3f}" in summary
