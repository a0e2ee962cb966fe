# python examples/space/screenshot.py [--model DIR] [--out examples/space/screenshot.png]
"""Take the screenshot of the demo in docs/scoring.md: start app.py on 127.0.0.1, fill in its example (a harmful
request, a refusal and a compliance), press Score, and save what Debian's headless Chromium shows once both charts are
drawn."""

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from app import DEMO_CHECKPOINT, EXAMPLE  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"app.py exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"app.py did not answer on {url} in {timeout} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("ARMORM_MODEL", str(DEMO_CHECKPOINT)))
    parser.add_argument("--out", default=str(HERE / "screenshot.png"))
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "ARMORM_MODEL": args.model, "GRADIO_SERVER_NAME": "127.0.0.1"}
    env |= {"GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, str(HERE / "app.py")], env=env)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"  # Debian's; with the driver's path, selenium-manager never runs
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1250"):
        options.add_argument(flag)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, app)
        driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 300)
            for elem_id, text in zip(("prompt", "answer-a", "answer-b"), EXAMPLE):
                wait.until(
                    lambda d, elem_id=elem_id: d.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea")
                ).send_keys(text)
            driver.find_element(By.ID, "score-button").click()
            for chart in ("chart-a", "chart-b"):
                wait.until(
                    lambda d, chart=chart: any(
                        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
                        for image in d.find_elements(By.CSS_SELECTOR, f"#{chart} img")
                    )
                )
            time.sleep(1)  # the last layout pass
            driver.save_screenshot(args.out)
            print(f"wrote {args.out}")
        finally:
            driver.quit()
    finally:
        app.terminate()
        app.wait(timeout=60)


if __name__ == "__main__":
    main()
