"""trainkit serve: the HTTP API on a real server on 127.0.0.1, bad input, the batcher, and the page in
a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)."""
import asyncio
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, data_dir, run_cli, run_clis

httpx = pytest.importorskip("httpx", reason="needs the serve extra: pip install trainkit[serve]")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install trainkit[serve]")

from trainkit.commands.serve import Batcher, Predictor, create_app  # noqa: E402
from trainkit.errors import TrainkitError  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def png(array: np.ndarray) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def png_bomb(side: int) -> bytes:
    """A small PNG whose header says side x side 1-bit pixels (all of them zeros, well compressed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, mnist_dir):
    """A run trained here in seconds (4,096 images, one epoch; about 87-92% on its 500 test images).
    Fixed settings: the same model on every CPU, whatever --precision auto would choose there."""
    from trainkit import TrainConfig, train
    out = tmp_path_factory.mktemp("serve") / "run"
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.03, limit_train=4096, limit_test=500, progress=False,
                      precision="fp32", channels_last="off", compile="off", data_dir=str(mnist_dir))
    train(cfg, out=out)
    return out


@pytest.fixture(scope="module")
def digits(mnist):
    """Real MNIST test images (as PNG files' bytes) and their labels."""
    images = mnist.test_images[-40:, 0].numpy()
    return [png(a) for a in images], [str(int(y)) for y in mnist.test_labels[-40:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_run):
    """`python -m trainkit serve RUN --port FREE` in a subprocess, ready when /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainkit", "serve", served_run, "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "TRAINKIT_DATA_DIR": str(data_dir())})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not answer /health within 120 s"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


# ---------------------------------------------------------------------------------------------
# The API

@pytest.mark.slow
def test_predict_health_info_and_docs(server, digits, served_run):
    images, labels = digits
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    info = httpx.get(server + "/info").json()
    assert info["model"] == "s5net" and info["dataset"] == "mnist" and info["classes"] == list("0123456789")
    assert 70 <= info["accuracy"] <= 100 and info["epochs"] == 1
    assert info["preprocessing"]["mean"] == [pytest.approx(0.1307)] and info["preprocessing"]["image_shape"] == [1, 28, 28]
    right = 0
    for i, (image, label) in enumerate(zip(images, labels)):
        if i % 2:   # multipart form (as the page and `curl -F file=@x.png` send it) or the raw PNG body
            r = httpx.post(server + "/predict?top=3", files={"file": ("d.png", image, "image/png")})
        else:
            r = httpx.post(server + "/predict?top=3", content=image, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert len(answer["top"]) == 3 and answer["predicted"] == answer["top"][0]["class"]
        assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        right += answer["predicted"] == label
    assert right >= 0.75 * len(labels), f"{right}/{len(labels)} right"
    # the same numbers as `trainkit predict`: one preprocessing
    from trainkit.commands.inference import load_run, predict_files
    path = served_run.parent / "digit.png"
    path.write_bytes(images[0])
    expected = predict_files(load_run(served_run), [path])[0].numpy()
    got = httpx.post(server + "/predict", files={"file": ("d.png", images[0])}).json()["probabilities"]
    assert np.allclose([got[c] for c in info["classes"]], expected, atol=1e-4)
    assert httpx.get(server + "/docs").status_code == 200
    assert "/predict" in httpx.get(server + "/openapi.json").json()["paths"]
    assert httpx.get(server + "/run/confusion.png").headers["content-type"] == "image/png"


BAD_INPUTS = {
    "not an image": (400, {"files": {"file": ("notes.txt", b"hello, not a picture\n" * 20)}}, "not a readable"),
    "empty body": (400, {"content": b"", "headers": {"content-type": "image/png"}}, "empty"),
    "raw body not an image": (400, {"content": b"hello, not a picture\n" * 20,
                                    "headers": {"content-type": "image/png"}}, "not a readable"),
    "raw body, damaged PNG": (400, {"content": png(np.zeros((28, 28), np.uint8))[:40],
                                    "headers": {"content-type": "image/jpeg"}}, "not a readable"),
    "raw body bomb": (413, {"content": png_bomb(20_000), "headers": {"content-type": "application/octet-stream"}},
                      "decompression bomb"),
    "empty file": (400, {"files": {"file": ("x.png", b"")}}, "empty"),
    "form without a file": (400, {"content": b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
                                  "headers": {"content-type": "multipart/form-data; boundary=b"}}, "no file"),
    "50 MB upload": (413, {"content": b"\0" * (50 << 20), "headers": {"content-type": "image/png"}}, "limit"),
    "decompression bomb": (413, {"files": {"file": ("bomb.png", png_bomb(20_000))}}, "decompression bomb"),
    "top not a number": (422, {"params": {"top": "abc"},
                               "files": {"file": ("d.png", png(np.zeros((28, 28), np.uint8)))}},
                         "top: Input should be a valid integer"),
    "wrong content type": (415, {"content": b"{}", "headers": {"content-type": "application/json"}}, "content type"),
    "damaged PNG": (400, {"files": {"file": ("cut.png", png(np.zeros((28, 28), np.uint8))[:40])}}, "not a readable"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_4xx_line_and_the_server_keeps_serving(server, digits, case):
    status, request, fragment = BAD_INPUTS[case]
    r = httpx.post(server + "/predict", timeout=60, **request)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment in detail, detail
    good = httpx.post(server + "/predict", files={"file": ("d.png", digits[0][0])})
    assert good.status_code == 200 and httpx.get(server + "/health").status_code == 200


def test_a_bomb_is_refused_from_its_header_before_decoding():
    from trainkit.data.images import decode_image
    start = time.perf_counter()
    with pytest.raises(TrainkitError, match=r"was refused: Image size \(100000000 pixels\) exceeds limit"):
        decode_image(png_bomb(10_000), 1, (28, 28), max_pixels=4096 * 4096)
    assert time.perf_counter() - start < 1


# ---------------------------------------------------------------------------------------------
# Refused at start, in one line

@pytest.mark.slow
def test_a_missing_run_folder_is_one_line(tmp_path):
    assert_one_line_error(run_cli("serve", tmp_path / "nope"), "does not exist")


@pytest.mark.slow
def test_a_damaged_run_folder_is_one_line(served_run, tmp_path):
    damaged, worse = tmp_path / "damaged", tmp_path / "worse"
    shutil.copytree(served_run, damaged)
    (damaged / "model.pt").write_bytes(b"not a checkpoint")
    shutil.copytree(damaged, worse)
    (worse / "config.json").write_text("{")
    bad_weights, bad_config = run_clis(["serve", damaged], ["serve", worse])
    assert_one_line_error(bad_weights, "model.pt")
    assert_one_line_error(bad_config, "config.json")


@pytest.mark.slow
def test_bad_serve_flags_are_one_line(served_run):
    workers, max_batch = run_clis(["serve", served_run, "--workers", "0"], ["serve", served_run, "--max-batch", "0"])
    assert_one_line_error(workers, "--workers must be at least 1")
    assert_one_line_error(max_batch, "--max-batch must be at least 1")


def test_create_app_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(TrainkitError, match="not a trainkit run directory"):
        create_app(tmp_path)


@pytest.mark.slow
def test_help_works_without_importing_fastapi():
    code = ("import sys; from trainkit.commands.cli import build_parser; build_parser(); "
            "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# The batcher and the backends

def test_the_batcher_answers_each_request_with_its_own_row_and_batches_concurrent_ones():
    calls = []

    def predict(images):               # a real function of the batch: each image's mean, as one row
        calls.append(len(images))
        time.sleep(0.01)
        return images.float().mean(dim=(1, 2, 3), keepdim=False).unsqueeze(1).numpy()

    async def go(max_batch):
        batcher = Batcher(predict, max_batch)
        task = asyncio.create_task(batcher.run())
        await asyncio.sleep(0)
        images = [torch.full((1, 4, 4), i, dtype=torch.uint8) for i in range(40)]
        out = await asyncio.gather(*(batcher(im) for im in images))
        task.cancel()
        return [float(o[0]) for o in out]

    assert asyncio.run(go(64)) == [float(i) for i in range(40)]
    assert len(calls) < 40 and max(calls) > 1           # concurrent requests shared forwards
    calls.clear()
    assert asyncio.run(go(1)) == [float(i) for i in range(40)]
    assert calls == [1] * 40                            # --max-batch 1: one forward each


def test_the_batcher_runs_at_most_workers_forwards_at_once_and_hands_on_a_failure():
    running, most, sizes = [0], [0], []
    lock = threading.Lock()

    def predict(images):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            sizes.append(len(images))
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if (images == 255).any():
            raise RuntimeError("the model failed")
        return images.float().mean(dim=(1, 2, 3)).unsqueeze(1).numpy()

    async def go(workers, values):
        batcher = Batcher(predict, 4, workers)
        task = asyncio.create_task(batcher.run())
        await asyncio.sleep(0)
        out = await asyncio.gather(*(batcher(torch.full((1, 2, 2), v, dtype=torch.uint8)) for v in values),
                                   return_exceptions=True)
        task.cancel()
        return out

    out = asyncio.run(go(2, range(40)))
    assert [float(o[0]) for o in out] == [float(i) for i in range(40)]
    assert most[0] == 2 and max(sizes) == 4            # two forwards overlapped, none above max_batch
    most[0] = 0
    asyncio.run(go(1, range(12)))
    assert most[0] == 1
    # a forward that fails fails its own requests only, and the batcher goes on
    out = asyncio.run(go(2, [1, 255, 2, 3, 4, 5, 6, 7, 8, 9]))
    failed = [i for i, o in enumerate(out) if isinstance(o, RuntimeError)]
    assert 1 in failed and len(failed) <= 4 and all(float(out[i][0]) == [1, 255, 2, 3, 4, 5, 6, 7, 8, 9][i]
                                                    for i in range(10) if i not in failed)


@pytest.mark.slow
def test_onnx_runtime_gives_the_same_probabilities_as_pytorch(served_run, mnist):
    pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install trainkit[onnx]")
    from trainkit.commands.inference import load_run
    trained = load_run(served_run)
    images = mnist.test_images[:64]
    a, b = Predictor(trained, "torch")(images), Predictor(trained, "onnx")(images)
    assert a.shape == (64, 10) and np.allclose(a, b, atol=1e-4)


def test_the_torch_backend_runs_channels_last_only_when_the_model_gives_the_same_answer(finished_run, mnist):
    from trainkit import TrainConfig
    from trainkit.commands.inference import TrainedModel, load_run
    trained = load_run(finished_run)        # any trained S5Net: conftest's small run, not the served one
    images = mnist.test_images[:64]
    expected = trained.probabilities(images).numpy()
    predictor = Predictor(trained, "torch")
    assert predictor.channels_last                      # S5Net: convolutions, the same numbers
    assert np.allclose(predictor(images), expected, atol=1e-5)
    assert np.allclose(predictor(images[:1]), expected[:1], atol=1e-5)

    class Flattens(torch.nn.Module):                    # .view of a channels-last activation fails
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4 * 26 * 26, 10)

        def forward(self, x):
            return self.fc(self.conv(x).view(x.size(0), -1))

    plain = TrainedModel(Flattens().eval(), TrainConfig(), list("0123456789"), (0.5,), (0.5,), (1, 28, 28), "logits")
    expected = plain.probabilities(images).numpy()
    predictor = Predictor(plain, "torch")
    assert not predictor.channels_last
    assert np.allclose(predictor(images), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The page, in a real headless Chromium

@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's page tests (each opens its page afresh with browser.get)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    f"apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install trainkit[serve]")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # offline: every host name but the test server's fails to resolve (no CDN can be reached)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})    # every request it makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


POLL = 0.05     # seconds between a wait's looks at the page (selenium's default, 0.5 s, adds up over the page tests)


def predicted(server: str, image: bytes) -> str:
    """What /predict answers for an image file's bytes."""
    return httpx.post(server + "/predict", files={"file": ("d.png", image)}).json()["predicted"]


def wait_for_text(driver, element_id: str, timeout: float = 30) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout, POLL).until(lambda d: d.find_element(By.ID, element_id).text.strip())
    return driver.find_element(By.ID, element_id).text.strip()


@pytest.mark.slow
def test_the_page_classifies_a_drawn_one_and_an_uploaded_digit(server, browser, digits, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    assert wait_for_text(browser, "accuracy").endswith("%")          # the run's summary, from /info
    assert wait_for_text(browser, "dataset") == "mnist"
    pad = browser.find_element(By.ID, "pad")
    # a "1": one vertical stroke down the middle of the 280x280 canvas, by mouse events
    chain = ActionChains(browser, duration=10).move_to_element_with_offset(pad, 0, -100).click_and_hold()
    for dy in range(-80, 101, 20):
        chain.move_to_element_with_offset(pad, 0, dy)
    chain.release().perform()
    assert page_settled(browser) == "1"         # the whole stroke's answer, not one sent while it was drawn
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 5 and bars[0].find_element(By.CSS_SELECTOR, ".name").text == "1"
    if os.environ.get("TRAINKIT_SCREENSHOT"):        # docs/serve.png is made by hand with this
        browser.save_screenshot(os.environ["TRAINKIT_SCREENSHOT"])

    # a real MNIST test image, uploaded with the file input
    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "predicted").text == ""
    images, labels = digits
    index = next(i for i in range(len(images)) if labels[i] != "1" and predicted(server, images[i]) == labels[i])
    path = tmp_path / "digit.png"
    path.write_bytes(images[index])
    browser.find_element(By.ID, "file").send_keys(str(path))
    assert wait_for_text(browser, "predicted") == labels[index]


@pytest.mark.slow
def test_a_client_that_hangs_up_mid_upload_is_one_log_line(served_run, digits):
    """A raw socket says Content-Length 100000, sends 1,000 bytes and closes: the server's log gets
    one line (uvicorn printed a 30-line ClientDisconnect traceback) and it goes on answering."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainkit", "serve", served_run, "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "TRAINKIT_DATA_DIR": str(data_dir())})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" + bytes(996))
                time.sleep(0.3)
        time.sleep(0.5)
        answer = httpx.post(url + "/predict", content=digits[0][0], headers={"content-type": "image/png"}, timeout=30)
        assert answer.status_code == 200
    finally:
        proc.terminate()
        err = proc.communicate(timeout=20)[1]
    lines = [line for line in err.splitlines() if "hung up" in line]
    assert len(lines) == 3 and "after 1,000 of 100,000 bytes" in lines[0], err
    assert "Traceback" not in err and "ClientDisconnect" not in err, err


@pytest.mark.slow
def test_the_api_docs_render_offline(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    html = httpx.get(server + "/docs").text
    assert "cdn." not in html and "https://" not in html.replace("https://github.com", "")   # scripts from the server
    browser.get(server + "/docs")
    WebDriverWait(browser, 30, POLL).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
    assert "trainkit serve" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/predict", "/info", "/health"} <= paths
    if os.environ.get("TRAINKIT_DOCS_SCREENSHOT"):
        browser.save_screenshot(os.environ["TRAINKIT_DOCS_SCREENSHOT"])



def requested(browser) -> list[str]:
    """The addresses the browser asked for since the last call (Chrome's performance log)."""
    import json
    messages = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    return [m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"]


@pytest.mark.slow
def test_redoc_renders_offline_and_asks_nothing_of_another_host(server, browser):
    from urllib.parse import urlsplit

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    requested(browser)                  # what earlier tests asked for
    browser.get(server + "/redoc")
    WebDriverWait(browser, 30, POLL).until(lambda d: "/predict" in d.find_element(By.TAG_NAME, "body").text)
    WebDriverWait(browser, 30, POLL).until(lambda d: "API docs by Redocly" in d.find_element(By.TAG_NAME, "body").text)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Prediction" in body or "predicted" in body        # the response's model, not an empty schema
    time.sleep(0.5)                     # ReDoc's late images (its logo) are asked for after it renders
    urls = requested(browser)
    assert any(u.endswith("/redoc.standalone.js") for u in urls), urls
    away = [u for u in urls if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).hostname != "127.0.0.1"]
    assert away == [], away             # it fetched cdn.redoc.ly/redoc/logo-mini.svg
    if os.environ.get("TRAINKIT_REDOC_SCREENSHOT"):
        browser.save_screenshot(os.environ["TRAINKIT_REDOC_SCREENSHOT"])


def page_settled(browser, timeout: float = 30) -> str:
    """The page's prediction once no request is on its way (the last drawing's answer)."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, timeout, POLL).until(lambda d: d.execute_script("return !busy && !again"))
    time.sleep(0.3)
    WebDriverWait(browser, timeout, POLL).until(lambda d: d.execute_script("return !busy && !again"))
    return browser.find_element("id", "predicted").text.strip()


@pytest.mark.slow
def test_page_state_resets_on_error_clear_drawing_and_the_same_file_again(server, browser, digits, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    wait_for_text(browser, "accuracy")
    images, labels = digits
    first = next(i for i in range(len(images)) if predicted(server, images[i]) == labels[i])
    good, bad = tmp_path / "digit.png", tmp_path / "notes.png"
    good.write_bytes(images[first])
    bad.write_bytes(b"not a picture at all" * 10)
    file_input = browser.find_element(By.ID, "file")
    preview = browser.find_element(By.ID, "preview")
    file_input.send_keys(str(good))
    assert wait_for_text(browser, "predicted") == labels[first] and preview.is_displayed()
    # a failed upload: the error alone, not the old prediction beside it
    file_input.send_keys(str(bad))
    assert "not a readable" in wait_for_text(browser, "error")
    assert browser.find_element(By.ID, "predicted").text == "" and not browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    # the same file again is predicted again
    file_input.send_keys(str(good))
    assert wait_for_text(browser, "predicted") == labels[first] and browser.find_element(By.ID, "error").text == ""
    # a drawing removes the upload's preview
    pad = browser.find_element(By.ID, "pad")
    chain = ActionChains(browser, duration=10).move_to_element_with_offset(pad, 0, -100).click_and_hold()
    for dy in range(-80, 101, 20):
        chain.move_to_element_with_offset(pad, 0, dy)
    chain.release().perform()
    assert page_settled(browser) == "1" and not preview.is_displayed()
    # Clear empties the prediction, the file input and the preview
    file_input.send_keys(str(good))
    wait_for_text(browser, "predicted")
    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "predicted").text == "" and file_input.get_attribute("value") == ""
    assert not preview.is_displayed()
    # the run's figures, full size on a click
    figure = browser.find_element(By.CSS_SELECTOR, "#reports img")
    figure.click()
    full = browser.find_element(By.ID, "fullimg")
    assert browser.find_element(By.ID, "full").is_displayed()
    natural, shown = browser.execute_script("const i = arguments[0]; return [i.naturalWidth, i.clientWidth]", full)
    assert natural > 500 and shown == natural
    browser.find_element(By.ID, "full").click()
    assert not browser.find_element(By.ID, "full").is_displayed()


# Each digit as strokes in a unit box (x right, y down), the way a person draws it with a mouse.
STROKES = {
    "0": [[(0.5 + 0.38 * np.sin(t), 0.5 - 0.48 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 25)]],
    "1": [[(0.55, 0.02), (0.5, 0.98)]],
    "2": [[(0.12, 0.28), (0.25, 0.08), (0.5, 0.02), (0.75, 0.1), (0.82, 0.3), (0.7, 0.5), (0.4, 0.75),
           (0.12, 0.97), (0.9, 0.97)]],
    "3": [[(0.15, 0.1), (0.5, 0.02), (0.8, 0.15), (0.75, 0.38), (0.45, 0.48), (0.8, 0.6), (0.85, 0.8),
           (0.55, 0.97), (0.15, 0.9)]],
    "4": [[(0.65, 0.98), (0.65, 0.02), (0.1, 0.68), (0.92, 0.68)]],
    "5": [[(0.85, 0.03), (0.22, 0.03), (0.17, 0.45), (0.5, 0.38), (0.8, 0.5), (0.85, 0.75), (0.6, 0.96),
           (0.15, 0.9)]],
    "6": [[(0.75, 0.03), (0.4, 0.25), (0.2, 0.55), (0.2, 0.8), (0.45, 0.97), (0.75, 0.85), (0.8, 0.62),
           (0.55, 0.5), (0.22, 0.62)]],
    "7": [[(0.1, 0.04), (0.9, 0.04), (0.45, 0.98)]],
    "8": [[(0.5, 0.48), (0.22, 0.3), (0.26, 0.08), (0.5, 0.02), (0.74, 0.08), (0.78, 0.3), (0.5, 0.48),
           (0.2, 0.7), (0.25, 0.92), (0.5, 0.98), (0.75, 0.92), (0.8, 0.7), (0.5, 0.48)]],
    "9": [[(0.8, 0.3), (0.55, 0.45), (0.25, 0.38), (0.2, 0.15), (0.45, 0.02), (0.75, 0.1), (0.8, 0.3),
           (0.78, 0.6), (0.7, 0.98)]],
}


def earlier_framings(canvas: np.ndarray) -> dict[str, np.ndarray]:
    """What the page sent before: the whole canvas scaled to 28x28, and its bounding box scaled to 20
    and centred by the box (not by the mass); each (28, 28) uint8."""
    from PIL import Image
    whole = np.asarray(Image.fromarray(canvas).resize((28, 28), Image.BILINEAR))
    rows, cols = np.nonzero((canvas > 30).any(axis=1))[0], np.nonzero((canvas > 30).any(axis=0))[0]
    crop = canvas[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    s = 20 / max(crop.shape)
    w, h = max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))
    boxed = np.zeros((28, 28), np.uint8)
    top, left = (28 - h) // 2, (28 - w) // 2
    boxed[top:top + h, left:left + w] = np.asarray(Image.fromarray(crop).resize((w, h), Image.LANCZOS))
    return {"whole canvas": whole, "box centred": boxed}


@pytest.mark.slow
def test_drawn_digits_are_framed_like_mnist(server, browser, served_run):
    """Each digit 0-9 drawn large and off-centre with scripted strokes; the page's answers (the
    server frames the canvas like MNIST) against what the earlier page sent, with the same model."""
    import base64
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from trainkit.commands.inference import load_run

    trained = load_run(served_run)
    browser.get(server + "/")
    wait_for_text(browser, "accuracy")
    pad = browser.find_element(By.ID, "pad")
    right = {"MNIST framing (page)": 0, "whole canvas": 0, "box centred": 0}
    answers = {}
    for digit, strokes in STROKES.items():
        browser.find_element(By.ID, "clear").click()
        for stroke in strokes:       # in the canvas's right part, 180 px tall: large and off-centre
            at = lambda x, y: (int(-10 + 110 * x), int(-120 + 230 * y))    # offsets from the canvas's centre
            chain = ActionChains(browser, duration=5).move_to_element_with_offset(pad, *at(*stroke[0])).click_and_hold()
            for a, b in zip(stroke, stroke[1:]):
                for t in np.linspace(0, 1, 6)[1:]:
                    chain.move_to_element_with_offset(pad, *at(a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])))
            chain.release().perform()
        shown = page_settled(browser)
        right["MNIST framing (page)"] += shown == digit
        answers[digit] = shown
        url = browser.execute_script("return document.getElementById('pad').toDataURL('image/png')")
        canvas = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))).convert("L"))
        for name, image in earlier_framings(canvas).items():
            probs = trained.probabilities(torch.from_numpy(image.copy())[None, None])
            right[name] += trained.classes[int(probs.argmax())] == digit
        # the page shows what /predict answers for the same canvas
        answer = httpx.post(server + "/predict", files={"file": ("c.png", base64.b64decode(url.split(",")[1]))}).json()
        assert answer["predicted"] == shown
    print(f"\ndrawn digits 0-9 right: {right}; the page answered {answers}")
    assert right["MNIST framing (page)"] >= max(right["whole canvas"], right["box centred"])
    assert right["MNIST framing (page)"] >= 6


@pytest.mark.slow
def test_the_page_names_the_file_hides_a_broken_preview_closes_on_esc_and_has_an_icon(server, browser, digits,
                                                                                     tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server + "/")
    wait_for_text(browser, "accuracy")
    assert browser.find_element(By.ID, "epochs").text == "1 epoch"
    icon = browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href")
    answer = httpx.get(icon)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("image/svg+xml")
    assert "strokes add up" in browser.find_element(By.ID, "hint").text      # what a second stroke does
    images, labels = digits
    good, bad = tmp_path / "digit.png", tmp_path / "notes.png"
    good.write_bytes(images[0])
    bad.write_bytes(b"not a picture at all" * 10)
    file_input, preview = browser.find_element(By.ID, "file"), browser.find_element(By.ID, "preview")
    file_input.send_keys(str(bad))
    assert "not a readable" in wait_for_text(browser, "error")
    assert not preview.is_displayed()               # the error alone, no broken picture beside it
    file_input.send_keys(str(good))
    wait_for_text(browser, "predicted")
    assert browser.find_element(By.ID, "filename").text == "digit.png" and preview.is_displayed()
    if os.environ.get("TRAINKIT_PAGE_SCREENSHOT"):
        browser.save_screenshot(os.environ["TRAINKIT_PAGE_SCREENSHOT"])
    browser.find_element(By.CSS_SELECTOR, "#reports img").click()
    assert browser.find_element(By.ID, "full").is_displayed()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not browser.find_element(By.ID, "full").is_displayed()


# ---------------------------------------------------------------------------------------------
# The OpenAPI document says what the server answers

def response_schema(doc: dict, path: str, method: str, status: int) -> dict:
    """The JSON schema the document gives for an answer, with the document's components (for $ref)."""
    content = doc["paths"][path][method]["responses"][str(status)]["content"]
    assert list(content) == ["application/json"], content
    schema = content["application/json"]["schema"]
    assert "$ref" in schema, schema          # a model of its own, not an empty schema (Swagger's `null`)
    return {**schema, "components": doc["components"]}


def test_every_answer_validates_against_the_served_openapi_schema(finished_run, digits):
    from fastapi.testclient import TestClient
    from jsonschema import Draft202012Validator, ValidationError
    from openapi_spec_validator import validate

    with TestClient(create_app(finished_run, backend="torch", max_upload=1 << 20)) as client:
        doc = client.get("/openapi.json").json()
        validate(doc)                                  # a valid OpenAPI 3.1 document
        accepted = doc["paths"]["/predict"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "image/png", "image/jpeg", "image/*", "application/octet-stream"} <= set(accepted)
        answers = [("/health", "get", client.get("/health")), ("/info", "get", client.get("/info")),
                   ("/predict", "post", client.post("/predict", content=digits[0][0],
                                                    headers={"content-type": "image/png"}))]
        for case in ("not an image", "empty body", "top not a number", "wrong content type", "form without a file",
                     "50 MB upload"):
            answers.append(("/predict", "post", client.post("/predict", **BAD_INPUTS[case][1])))
        answers.append(("/predict", "post", client.post("/predict", params={"top": 0}, content=digits[0][0],
                                                        headers={"content-type": "image/png"})))
    statuses = set()
    for path, method, answer in answers:
        schema = response_schema(doc, path, method, answer.status_code)
        Draft202012Validator(schema).validate(answer.json())
        statuses.add(answer.status_code)
        with pytest.raises(ValidationError):            # the schema does hold the answer to a shape
            Draft202012Validator(schema).validate({"unexpected": 1})
    assert statuses == {200, 400, 413, 415, 422}
    # the models carry examples, which Swagger UI and ReDoc show instead of `null`
    models = doc["components"]["schemas"]
    assert models["Prediction"]["properties"]["predicted"]["examples"] and models["Problem"]["properties"]["detail"]["examples"]


def test_docs_quote_each_error_as_the_server_says_it(finished_run, digits):
    """docs/serve.md's table of bad input against the server's answers: each answer's status and
    detail match one of its rows (`...` standing for what changes). It said `... is not a readable
    PNG or JPEG image`, and had no detail for most."""
    import re

    from fastapi.testclient import TestClient

    rows = [line for line in (ROOT / "docs" / "serve.md").read_text().splitlines()
            if re.match(r"\| .* \| \d{3} \| `.*` \|$", line)]
    documented = [(int(status), re.escape(quote).replace(re.escape("..."), ".*"))
                  for status, quote in (re.search(r"\| (\d{3}) \| `(.*)` \|$", row).groups() for row in rows)]
    assert len(documented) >= 8
    with TestClient(create_app(finished_run, backend="torch", max_upload=1 << 20)) as client:
        answers = [client.post("/predict", **request) for _, request, _ in BAD_INPUTS.values()]
        answers.append(client.post("/predict", params={"top": 0}, content=digits[0][0],
                                   headers={"content-type": "image/png"}))
    for answer in answers:
        detail = answer.json()["detail"]
        assert any(status == answer.status_code and re.fullmatch(pattern, detail) for status, pattern in documented), \
            (answer.status_code, detail)
