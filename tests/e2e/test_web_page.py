"""The try-cloning page at `/`, driven in a real headless Chromium (Selenium + Debian's chromium-driver).

The server runs with the tiny model and a token on loopback; the page is given a generated reference WAV through
its file input, then clones through the REST endpoint (whole WAV) and through the WebSocket stream (chunks
scheduled on the Web Audio clock), and both must give the audio the API gives for the same request and seed.
Set HIGGS_LORA_SCREENSHOT_DIR to keep the page's screenshot (docs/img/web_page.png was made so).
"""

import base64
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.slow

TOKEN = "page-token-456"
REFERENCE_TEXT = "تَشْرَبُ الجَدَّةُ الشَّايَ فِي الحَدِيقَةِ"
TARGET_TEXT = "مرحبا بكم"
FIELDS = {
    "reference_text": REFERENCE_TEXT,
    "target_text": TARGET_TEXT,
    "max_seconds": "1",
    "seed": "7",
    "adapter": "voice_b",
}


def _browser() -> tuple[str, str]:
    """Paths of Chromium and its driver; a skip (a failure in CI, which installs both) when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        selenium_missing = True
    else:
        selenium_missing = False
    if chromium and driver and not selenium_missing:
        return chromium, driver
    missing = "selenium (the dev extra)" if selenium_missing else "chromium and chromium-driver (apt)"
    if os.environ.get("HIGGS_LORA_CI"):
        pytest.fail(f"{missing} is not installed, but CI must test the page: .ci/run and make install provide it")
    pytest.skip(f"needs {missing} to drive the page in a real browser; CI installs them")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    """Two random LoRA adapters on the tiny base (PEFT format, run config beside them): the page's choice."""
    import torch
    from peft import LoraConfig, get_peft_model

    from higgs_lora.config import ModelConfig, RunConfig, save_config
    from higgs_lora.model.loading import load_base_model

    root = tmp_path_factory.mktemp("adapters")
    for seed, name in [(1, "voice_a"), (2, "voice_b")]:
        base = load_base_model(ModelConfig(path=str(tiny_checkpoint.model_dir), dtype="fp32"))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        model.save_pretrained(root / name)
        cfg = RunConfig()
        cfg.model.path = str(tiny_checkpoint.model_dir)
        save_config(cfg, root / name / "higgs_lora.yaml")
    return {name: str(root / name) for name in ("voice_a", "voice_b")}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, adapters):
    port = _free_port()
    env = {**os.environ, "HIGGS_LORA_TOKEN": TOKEN, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "higgs_lora.serve", "--model", str(tiny_checkpoint.model_dir), "--port", str(port)]
    command += [f"--adapter={name}={path}" for name, path in adapters.items()]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            if time.time() > deadline:
                process.kill()
                pytest.fail("server did not start in 180 s")
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def reference_wav(tmp_path_factory) -> Path:
    """Two seconds of a voiced-like harmonic tone with a little noise, 24 kHz mono PCM16."""
    rate = 24000
    t = np.arange(2 * rate) / rate
    rng = np.random.default_rng(0)
    pitch = 140 + 20 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    wave = 0.3 * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(len(t))
    path = tmp_path_factory.mktemp("page") / "reference.wav"
    sf.write(path, wave.astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--mute-audio",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream",  # a microphone that beeps, for the Record button
        "--use-fake-ui-for-media-stream",  # microphone permission granted without a prompt
        "--window-size=900,1300",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=driver_path, env={**os.environ, "HOME": str(profile)})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _wait_for_status(driver, timeout: float = 240) -> tuple[str, str]:
    """(state, text) of the page's status line once it is done or an error."""
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(d):
        state = d.find_element("id", "status").get_attribute("data-state")
        return state in ("done", "error") and (state, d.find_element("id", "status").text)

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(settled)


def _result_samples(driver, player: str = "result") -> np.ndarray:
    """The WAV a player of the page holds (its blob URL read back by the page), as int16 samples."""
    return _blob_wav(driver, player)[0]


def _blob_wav(driver, player: str) -> tuple[np.ndarray, int]:
    encoded = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById(arguments[0]).src).then((r) => r.arrayBuffer()).then((buffer) => {
          const bytes = new Uint8Array(buffer); let text = "";
          for (let i = 0; i < bytes.length; i += 0x8000) {
            text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
          }
          done(btoa(text));
        });
        """,
        player,
    )
    samples, rate = sf.read(io.BytesIO(base64.b64decode(encoded)), dtype="int16")
    assert player != "result" or rate == 24000
    return samples, rate


def _player_duration(driver) -> float:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "const a = document.getElementById('result'); return a.readyState >= 1 ? a.duration : null;"
        )
    )


def _fill_form(driver, reference: Path, token: str) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    loads = driver.execute_script("document.getElementById('token').value = ''; return state.loads")
    driver.find_element("id", "token").send_keys(token, Keys.TAB)  # leaving the field: its change event
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return state.loads") > loads)  # adapters asked
    driver.find_element("id", "reference").send_keys(str(reference))
    for element_id, text in (("reference-text", REFERENCE_TEXT), ("target-text", TARGET_TEXT)):
        driver.find_element("id", element_id).clear()
        driver.find_element("id", element_id).send_keys(text)
    if not driver.find_element("css selector", "details").get_attribute("open"):
        driver.find_element("css selector", "details summary").click()
    for element_id, value in (("seed", FIELDS["seed"]), ("max-seconds", FIELDS["max_seconds"])):
        driver.find_element("id", element_id).clear()
        driver.find_element("id", element_id).send_keys(value)


def _api_clone(server: str, reference: Path, fields: dict = FIELDS) -> np.ndarray:
    with reference.open("rb") as handle:
        response = httpx.post(
            f"{server}/v1/clone",
            headers={"Authorization": f"Bearer {TOKEN}"},
            data=fields,
            files={"reference_audio": ("reference.wav", handle, "audio/wav")},
            timeout=240,
        )
    assert response.status_code == 200, response.text
    samples, _ = sf.read(io.BytesIO(response.content), dtype="int16")
    return samples


def _api_stream(server: str, reference: Path) -> np.ndarray:
    import asyncio
    import json

    import websockets

    async def run():
        body = {**FIELDS, "reference_audio_base64": base64.b64encode(reference.read_bytes()).decode()}
        async with websockets.connect(server.replace("http", "ws") + f"/v1/stream?token={TOKEN}") as ws:
            await ws.send(json.dumps(body))
            return [message async for message in ws]

    messages = asyncio.run(run())
    assert json.loads(messages[-1])["type"] == "end"
    return np.frombuffer(b"".join(m for m in messages if isinstance(m, bytes)), dtype="<i2")


def test_page_is_public_and_self_contained(server):
    page = httpx.get(f"{server}/")  # no token: the page holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="target-text" dir="rtl"' in html and 'type="file"' in html and "MediaRecorder" in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # nothing fetched
    assert httpx.get(f"{server}/v1/adapters").status_code == 401  # while the API still needs the token


def test_page_clones_through_rest_and_stream_in_chromium(server, browser, reference_wav):
    expected = _api_clone(server, reference_wav)
    assert len(expected) > 0
    base_fields = {**FIELDS, "adapter": "base"}
    assert not np.array_equal(_api_clone(server, reference_wav, base_fields), expected)  # the choice matters
    browser.get(f"{server}/")
    state, text = _wait_for_status(browser, timeout=30)
    assert state == "error" and "token" in text  # the API refused the page's adapter request without one

    _fill_form(browser, reference_wav, "wrong-token")
    browser.find_element("id", "clone").click()
    state, text = _wait_for_status(browser)
    assert state == "error" and "401" in text, text

    _fill_form(browser, reference_wav, TOKEN)
    from selenium.webdriver.support.ui import Select

    choice = Select(browser.find_element("id", "adapter"))
    assert [o.get_attribute("value") for o in choice.options] == ["voice_a", "voice_b", "base"]
    assert choice.first_selected_option.get_attribute("value") == "voice_a"  # the server's default
    choice.select_by_value("voice_b")
    assert browser.find_element("id", "reference-player").is_displayed()  # the chosen file, ready to listen to
    browser.find_element("id", "clone").click()
    state, text = _wait_for_status(browser)
    assert state == "done" and text.startswith("done: ") and "s of audio" in text, text
    whole = _result_samples(browser)
    np.testing.assert_array_equal(whole, expected)  # the page sent what the API client sent: same audio
    assert _player_duration(browser) == pytest.approx(len(expected) / 24000, abs=1e-3)
    download = browser.find_element("id", "download")
    assert download.is_displayed() and download.get_attribute("download") == "clone.wav"
    assert download.get_attribute("href") == browser.find_element("id", "result").get_attribute("src")

    browser.execute_script("document.getElementById('status').dataset.state = 'idle'")
    browser.find_element("id", "stream").click()
    state, text = _wait_for_status(browser)
    assert state == "done" and "chunks" in text, text
    streamed = _result_samples(browser)
    np.testing.assert_array_equal(streamed, _api_stream(server, reference_wav))  # the chunks, joined in order
    # and the whole WAV but for the stream's rounding (2 LSB) and its chunked decode (1e-3 of peak): test_serve.py
    assert len(streamed) == len(expected)
    assert np.abs(streamed.astype(int) - expected).max() <= 1e-3 * max(int(np.abs(expected).max()), 1) + 2
    chunks = int(text.split(" chunks")[0].rsplit(" ", 1)[1])
    assert chunks >= 1 and browser.execute_script("return state.scheduled") == chunks  # each one went to Web Audio
    assert _player_duration(browser) == pytest.approx(len(expected) / 24000, abs=1e-3)

    shot = browser.get_screenshot_as_png()
    from PIL import Image

    image = Image.open(io.BytesIO(shot))
    assert image.size[0] >= 800 and len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # not a blank page
    if os.environ.get("HIGGS_LORA_SCREENSHOT_DIR"):
        (Path(os.environ["HIGGS_LORA_SCREENSHOT_DIR"]) / "web_page.png").write_bytes(shot)


def test_a_recorded_reference_is_sent_as_a_wav_and_cloned(server, browser):
    """Record (Chromium's fake microphone), stop, and clone from the take: MediaRecorder's webm is decoded in the
    page and sent as a WAV the server reads."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return state.loads") >= 1)
    assert browser.find_element("id", "token").get_attribute("value") == TOKEN  # remembered in this tab
    browser.find_element("id", "record").click()
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return state.recordedParts") >= 10)  # 2.5 s
    browser.find_element("id", "record").click()  # Stop
    WebDriverWait(browser, 30).until(lambda d: "recording.wav" in d.find_element("id", "reference-info").text)
    take, rate = _blob_wav(browser, "reference-player")
    assert rate >= 16000 and len(take) / rate >= 2.0 and np.abs(take).max() > 1000  # the beeps are in it
    browser.find_element("css selector", "details summary").click()
    for element_id, text in (("reference-text", REFERENCE_TEXT), ("target-text", TARGET_TEXT), ("max-seconds", "1")):
        browser.find_element("id", element_id).clear()
        browser.find_element("id", element_id).send_keys(text)
    browser.find_element("id", "clone").click()
    state, text = _wait_for_status(browser)
    assert state == "done" and "s of audio" in text, text
    assert len(_result_samples(browser)) > 0
