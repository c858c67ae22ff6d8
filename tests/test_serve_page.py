"""The chat page of minigpt serve in a real headless Chromium (Debian's chromium and chromedriver,
driven by Selenium): a message typed, the reply streamed in, a <script> reply shown as text,
Chinese in and out. Set MINIGPT_SCREENSHOT=PATH to save the page (docs/serve_chat.png is made so).
"""

import os
import shutil
import time

import pytest

from minigpt.model_folder import load
from minigpt.server import ServerThread, ServeSettings, create_app
from serving import REPLIES

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Skipped where the browser is missing, except under CI=true, where .ci/run installs it: there it must run.
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and os.environ.get("CI") != "true",
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(memorising_model):
    app = create_app(load(memorising_model), ServeSettings("tiny-chat"))
    batcher, step = app.state.batcher, app.state.batcher.engine.step

    def visible_step():  # a token every 20 ms, so the page is seen filling in as a person would see it
        time.sleep(0.02)
        return step()

    batcher.engine.step = visible_step
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1000,640",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    # The system chromedriver, named explicitly: otherwise Selenium tries to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def send(browser, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def wait_for(browser, script, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = browser.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout} s for: {script}")


def test_the_page_streams_replies_shows_html_as_text_and_handles_chinese(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    assert wait_for(browser, "return document.getElementById('model-name').textContent === 'tiny-chat'")
    title = browser.title
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")  # greedy: the replies the model memorised
    # Record every length the reply's text goes through while it streams in.
    browser.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.assistant');
            if (replies.length) window.lengths.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    send(browser, "Say hi")
    wait_for(browser, "return document.querySelectorAll('.assistant.done').length === 1")
    reply = browser.find_elements(By.CSS_SELECTOR, ".assistant")[0]
    assert reply.text == REPLIES["Say hi"]  # the <script> tag is on screen as characters
    assert reply.get_attribute("data-finish") == "stop"
    assert browser.find_elements(By.CSS_SELECTOR, "#messages script") == [] and browser.title == title  # and never ran
    lengths = browser.execute_script("return window.lengths")
    assert len(set(lengths) - {0, len(REPLIES["Say hi"])}) >= 3  # the reply grew piece by piece: streamed

    send(browser, "你好")
    wait_for(browser, "return document.querySelectorAll('.assistant.done').length === 2")
    assert browser.find_elements(By.CSS_SELECTOR, ".user")[1].text == "你好"
    assert browser.find_elements(By.CSS_SELECTOR, ".assistant")[1].text == REPLIES["你好"]
    if os.environ.get("MINIGPT_SCREENSHOT"):
        browser.save_screenshot(os.environ["MINIGPT_SCREENSHOT"])

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []


def test_stop_ends_a_reply_and_server_errors_are_shown(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    wait_for(browser, "return document.getElementById('model-name').textContent === 'tiny-chat'")
    send(browser, "Count")
    wait_for(browser, "const r = document.querySelector('.assistant'); return r && r.textContent.length > 3")
    browser.find_element(By.ID, "stop").click()
    wait_for(browser, "return document.querySelectorAll('.assistant.done').length === 1")
    stopped = browser.find_element(By.CSS_SELECTOR, ".assistant")
    assert stopped.get_attribute("data-finish") == "stopped" and len(stopped.text) < len(REPLIES["Count"])
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("5000")
    send(browser, "Say hi")
    error = wait_for(browser, "const e = document.querySelector('.error'); return e && e.textContent")
    assert "at most 1024 (--max-tokens-limit)" in error
