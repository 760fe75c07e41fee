"""The page of ``edgekt serve`` in a real headless browser (Debian's chromium + chromedriver,
driven by selenium): upload a photo, enroll two classes from photo files, predict the new
class, remove a class. ``scripts/test.sh`` installs the browser."""

from __future__ import annotations

import os
import shutil

import _serve_support as sup
import pytest
from _serve_support import BAG, SNEAKER

from edgekt.devices.serve.app import create_app
from edgekt.devices.serve.service import Service

device_models, photos = sup.device_models, sup.photos  # session fixtures

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.fail("the page test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; scripts/test.sh does it)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=900,1400", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_person_enrolls_a_class_and_the_page_recognises_it(browser, device_models, photos,
                                                              tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    files = {}
    for name, cls in (("shoe", SNEAKER), ("bag", BAG)):
        files[name] = []
        for i, img in enumerate(photos.of(cls, 6)):
            path = tmp_path / f"{name}{i}.png"
            path.write_bytes(sup.png(img, "RGB"))  # colour files, as a phone takes them
            files[name].append(str(path))
    service = Service(device_models.package, tmp_path / "state", threads=1)
    wait = WebDriverWait(browser, 20)

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def upload(element_id: str, paths: list[str]) -> None:
        browser.find_element(By.ID, element_id).send_keys("\n".join(paths))

    try:
        with sup.ThreadServer(create_app(service)) as server:
            browser.get(server.url + "/")
            wait.until(lambda d: "model version" in text("status"))
            assert service.package.version in text("status")

            # A photo before any class is enrolled: the model's own prediction only.
            upload("predict-file", files["bag"][5:])
            wait.until(lambda d: "%" in text("predict-result"))
            assert text("predict-result").split(" (")[0] in device_models.labels

            for label, name in (("running shoe", "shoe"), ("bag", "bag")):
                field = browser.find_element(By.ID, "enroll-label")
                field.clear()
                field.send_keys(label)
                upload("enroll-files", files[name][:5])
                browser.find_element(By.ID, "enroll-button").click()
                wait.until(lambda d, label=label: f"Enrolled \u201c{label}\u201d from 5 photos"
                           in text("enroll-status"))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classes li")) == 2)
            items = browser.find_elements(By.CSS_SELECTOR, "#classes li")
            assert [li.text.split(" (")[0] for li in items] == ["running shoe", "bag"]

            # New photos of both classes are recognised as the enrolled classes.
            for name, label in (("shoe", "running shoe"), ("bag", "bag")):
                upload("predict-file", files[name][5:])
                wait.until(lambda d, label=label: text("fewshot-result") == label)
            browser.save_screenshot(str(tmp_path / "page.png"))

            browser.find_element(By.CSS_SELECTOR, "#classes button[data-label='bag']").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classes li")) == 1)
            assert "Removed \u201cbag\u201d" in text("classes-status")
        assert service.runtime.fewshot.labels() == ["running shoe"]  # on disk as well
        assert service.runtime.fewshot.shots("running shoe") == 5
    finally:
        service.close()
    assert Service(device_models.package, tmp_path / "state").runtime.fewshot.labels() == \
        ["running shoe"]
