"""A real headless Chromium (Debian's chromium and chromium-driver, installed by `make browser`)
driven by selenium. Both paths are given, so Selenium Manager never looks for, or downloads, a
browser or a driver."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Rendered:
    images: list[dict]
    """Every <img>: alt, natural width and height, complete."""
    console: list[dict]
    """The browser console's entries (level, message)."""
    title: str
    text: str


def render(page: Path, screenshot: Path) -> Rendered:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "chromium and chromedriver are needed: `make browser` (apt-get install chromium chromium-driver)"
    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        chrome.get(page.resolve().as_uri())
        images = chrome.execute_script(
            "return Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight,"
            " complete: i.complete}))")
        chrome.save_screenshot(str(screenshot))
        return Rendered(images=images, console=chrome.get_log("browser"), title=chrome.title,
                        text=chrome.find_element("tag name", "body").text)
    finally:
        chrome.quit()
