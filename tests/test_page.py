"""The page of `sedense serve`, driven in a real browser (headless Chromium through Selenium)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import best_checkpoint, newest_run, predict_args, run_cli, serving

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if BROWSER is None or DRIVER is None:
        pytest.skip("no Chromium here (`apt-get install chromium chromium-driver`); .ci/run installs it")
    webdriver = pytest.importorskip("selenium.webdriver", reason="Selenium is in the dev extra")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# Chromium is several processes, and the service two more: never beside a test that times itself
@pytest.mark.xdist_group("processes")
def test_the_page_classifies_a_photo_like_predict_and_survives_bad_files(trained_run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    inbox = tmp_path / "inbox"
    for photo in sorted((trained_run / "data").rglob("*.png"))[::4]:
        (inbox / photo.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, inbox / photo.parent.name / photo.name)
    run_cli(predict_args(best_checkpoint(trained_run), inbox, tmp_path / "predicted"), tmp_path)
    predicted = json.loads((newest_run(tmp_path / "predicted") / "predictions.json").read_text())
    api = {Path(r["path"]): r for r in predicted}  # what predict says of each photo: the page must say the same
    photos = sorted(api)
    confidences = sorted(a["confidence"] for a in api.values())
    threshold = (confidences[0] + confidences[-1]) / 2  # one photo above it, one below: both answers shown
    sure, unsure = max(photos, key=lambda p: api[p]["confidence"]), min(photos, key=lambda p: api[p]["confidence"])

    with serving(trained_run, "--ckpt_path", "best", "--max_upload_mb", "1", "--threshold", f"{threshold:.6f}") as url:
        browser.get(url + "/")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Which class is it?"
        wait = WebDriverWait(browser, 60)

        def send(path: Path, explain: bool = False) -> None:
            box = browser.find_element(By.ID, "explain")
            if box.is_selected() != explain:
                box.click()
            browser.execute_script("document.getElementById('answer').textContent = '';"
                                   "document.getElementById('error').style.display = 'none';")
            browser.find_element(By.ID, "file").send_keys(str(path))
            wait.until(lambda b: b.find_element(By.ID, "error").is_displayed()
                       or b.find_element(By.ID, "time").text.startswith("Answered"))

        send(sure, explain=True)
        answer = browser.find_element(By.ID, "answer")
        assert answer.text == api[sure]["class"] == answer.get_attribute("data-class")
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
        assert [b.text.split("\n")[0] for b in bars] == [t["class"] for t in api[sure]["top_k"]]
        assert browser.find_element(By.ID, "heat").is_displayed()
        assert browser.execute_script("return document.getElementById('heat').naturalWidth") == 16  # TINY's input size
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000

        send(unsure)
        top2 = api[unsure]["top_k"][:2]
        assert answer.text == "Not sure: " + " / ".join(f"{t['class']} {t['probability']:.2f}" for t in top2)
        assert not browser.find_element(By.ID, "heatbox").is_displayed()

        text = tmp_path / "notes.jpg"
        text.write_text("not a photo")
        big = tmp_path / "huge.jpg"
        big.write_bytes(sure.read_bytes() + b"\0" * 2**21)
        for bad, message in ((text, "notes.jpg: not a usable image"), (big, "huge.jpg is 2.0 MB; the limit is 1")):
            send(bad)
            error = browser.find_element(By.ID, "error")
            assert error.is_displayed() and error.text.startswith(message) and "Traceback" not in error.text
        send(sure)  # the page still works
        assert answer.text == api[sure]["class"] and not browser.find_element(By.ID, "error").is_displayed()
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/predict" not in e["message"]]
        assert logs == [], json.dumps(logs)
