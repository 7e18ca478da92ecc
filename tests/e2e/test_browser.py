"""The pages in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium) opens a run's report.html, a sweep's report.html and the demo; each page must log
no console error and show every image (naturalWidth > 0). The demo is asked a question about an
uploaded image; its answer, read back from the page, must be `mmbridge generate`'s.

With MMBRIDGE_SCREENSHOTS=DIR (e.g. docs/img) the screenshots are kept there for the docs.
Skipped, with the reason, only where Chromium, its driver or Selenium is absent
(scripts/setup.sh installs all three)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from picture_runs import qformer_run, shared_dir, two_by_two_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
# the tiny run is trained once per session (tests/picture_runs.py); xdist keeps these together
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.xdist_group("pictures"),
    pytest.mark.slow,  # a browser, and the shared tiny training
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="no chromium / chromedriver (apt-get install chromium "
        "chromium-driver, as scripts/setup.sh does)",
    ),
]
# the page's images that did not load (naturalWidth 0) or have not finished loading
BROKEN_IMAGES = (
    "return Array.from(document.images)"
    ".filter(i => !i.complete || i.naturalWidth === 0)"
    ".map(i => i.alt || i.src.slice(0, 60))"
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install 'mmbridge[browser]')"
    )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        "--disable-extensions",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def picture_run(tmp_path_factory) -> Path:
    """The session's tiny Q-Former run (tests/picture_runs.py), trained once."""
    return qformer_run(shared_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def picture_sweep(tmp_path_factory) -> Path:
    return two_by_two_sweep(shared_dir(tmp_path_factory))


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver, name: str, full_page: bool = True) -> Path:
    """A PNG of the page (its whole height when ``full_page``), kept under
    $MMBRIDGE_SCREENSHOTS when set."""
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        # the window's own bars take part of its height: room to spare below the page
        driver.set_window_size(1200, min(int(height) + 200, 8000))
    keep = os.environ.get("MMBRIDGE_SCREENSHOTS")
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="mmbridge-shots-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path))
    driver.set_window_size(1200, 900)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] >= 1000 and im.getextrema() != ((255, 255),) * 3  # not a blank page
    return path


def open_page(driver, url: str, wait_s: float = 30) -> None:
    """Load ``url`` and wait until the document is complete (a loaded machine can take seconds
    for a served page's scripts); fail naming the URL and the state it stayed in."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    state = lambda d: d.execute_script("return document.readyState")  # noqa: E731
    try:
        WebDriverWait(driver, wait_s).until(lambda d: state(d) == "complete")
    except TimeoutException:
        pytest.fail(f"{url}: document.readyState {state(driver)!r} after {wait_s} s")


def test_run_report(browser, picture_run):
    run = picture_run
    open_page(browser, (run / "report.html").as_uri())
    n_images = browser.execute_script("return document.images.length")
    assert n_images >= 3  # thumbnails of the gallery and the attention sheets
    assert browser.execute_script(BROKEN_IMAGES) == []
    assert browser.find_element("css selector", "#attention").is_displayed()
    assert console_errors(browser) == []
    screenshot(browser, "run_report")


def test_sweep_report(browser, picture_sweep):
    from mmbridge.reporting.tables import write_report

    root = picture_sweep
    write_report(root, baseline=["+variant=a"], n_resamples=200)
    open_page(browser, (root / "report.html").as_uri())
    assert browser.execute_script(BROKEN_IMAGES) == []
    assert len(browser.find_elements("css selector", "#disagree ~ .gallery .card")) == 2
    assert browser.find_elements("css selector", "#forest + svg circle")
    assert console_errors(browser) == []
    screenshot(browser, "sweep_report")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_answers_as_generate(browser, picture_run, capsys):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'mmbridge[demo]')")
    from selenium.webdriver.support.ui import WebDriverWait

    import mmbridge
    from mmbridge.commands import demo
    from mmbridge.commands.generate import main as generate

    run = picture_run
    ckpt = run / "checkpoints" / "final"
    image = json.loads((run / "predictions.jsonl").read_text().splitlines()[0])["media"]["image"]
    question = "What colour is the shape?"
    assert (
        generate(
            [
                f"checkpoint={ckpt}",
                f"image={image}",
                f"prompt={question}",
                "max_new_tokens=6",
                "device=cpu",
            ]
        )
        == 0
    )
    expected = capsys.readouterr().out.strip()
    model = mmbridge.load(ckpt, device="cpu")
    page = demo.build({"run A": model, "run B": model}, max_new_tokens=6)
    port = free_port()
    demo.launch(page, port=port, block=False)
    try:
        open_page(browser, f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_elements("css selector", "#question textarea"))
        browser.find_element("css selector", "#image input[type=file]").send_keys(image)
        wait.until(lambda d: d.find_elements("css selector", "#image img"))
        browser.find_element("css selector", "#question textarea").send_keys(question)
        browser.find_element("css selector", "#ask").click()

        def replies(d):
            got = [
                [e.text for e in d.find_elements("css selector", f"#chat{i} .bot")] for i in (0, 1)
            ]
            return got if all(any(t.strip() for t in g) for g in got) else False

        answers = wait.until(replies)

        # the page shows the text; the browser collapses runs of white space and drops control
        # characters, so both sides are compared that way
        def shown(text: str) -> str:
            return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())

        assert [shown(a[-1]) for a in answers] == [shown(expected)] * 2
        assert browser.execute_script(BROKEN_IMAGES) == []
        assert console_errors(browser) == []
        screenshot(browser, "demo", full_page=False)
    finally:
        page.close()
