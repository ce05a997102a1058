"""The server started with real uvicorn on loopback (`python -m higgs_lora.serve`), and the batch CLI."""

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from higgs_lora.tiny import REPO_ROOT

pytestmark = pytest.mark.slow

CORPUS = REPO_ROOT / "examples" / "demo_corpus"
REFERENCE = CORPUS / "spk_f1" / "spk_f1_01.flac"
REFERENCE_TEXT = "تَشْرَبُ الجَدَّةُ الشَّايَ فِي الحَدِيقَةِ"
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    port = free_port()
    env = {**os.environ, "HIGGS_LORA_TOKEN": TOKEN, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "higgs_lora.serve.app",
            "--model",
            str(tiny_checkpoint.model_dir),
            "--port",
            str(port),
            "--max-upload-mb",
            "1",
            "--max-reference-seconds",
            "12",
            "--max-text-chars",
            "300",
            "--max-batch",
            "8",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("server did not start in 180 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def clone_form(**fields):
    data = {"reference_text": REFERENCE_TEXT, "target_text": "مرحبا بكم", "max_seconds": "1", "seed": "3", **fields}
    return data


def test_rest_clone_returns_a_24khz_wav(server):
    with REFERENCE.open("rb") as handle:
        response = httpx.post(
            f"{server}/v1/clone",
            headers=AUTH,
            data=clone_form(),
            files={"reference_audio": ("ref.flac", handle, "audio/flac")},
            timeout=120,
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(response.content))
    assert rate == 24000 and samples.ndim == 1 and len(samples) > 0
    assert abs(len(samples) / rate - float(response.headers["X-Audio-Seconds"])) < 1e-3
    assert response.headers["X-Seed"] == "3"
    body = {**clone_form(), "reference_audio_base64": base64.b64encode(REFERENCE.read_bytes()).decode()}
    again = httpx.post(f"{server}/v1/clone", headers=AUTH, json=body, timeout=120)
    assert again.status_code == 200 and again.content == response.content  # same seed, same request: same audio


def test_health_adapters_and_openapi(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}  # with a token: a bare liveness answer
    health = httpx.get(f"{server}/health", headers=AUTH).json()
    assert health["status"] == "ok" and health["sample_rate"] == 24000
    assert httpx.get(f"{server}/v1/adapters", headers=AUTH).json() == {"adapters": [], "default": None}
    assert httpx.get(f"{server}/openapi.json").status_code == 401
    paths = httpx.get(f"{server}/openapi.json", headers=AUTH).json()["paths"]
    assert {"/v1/clone", "/health", "/v1/adapters"} <= set(paths)


def test_websocket_streams_chunks_then_a_final_message(server):
    import websockets

    async def run():
        uri = server.replace("http", "ws") + f"/v1/stream?token={TOKEN}"
        request = {
            **clone_form(max_seconds="2", target_text="الطقس اليوم معتدل"),
            "reference_audio_base64": base64.b64encode(REFERENCE.read_bytes()).decode(),
        }
        messages = []
        async with websockets.connect(uri, max_size=None) as ws:
            await ws.send(json.dumps(request))
            async for message in ws:
                messages.append(message)
        return messages

    messages = asyncio.run(run())
    start, end = json.loads(messages[0]), json.loads(messages[-1])
    audio = [m for m in messages[1:-1] if isinstance(m, bytes)]
    assert start["type"] == "start" and start["sample_rate"] == 24000
    assert end["type"] == "end" and end["chunks"] == len(audio) >= 2
    total = sum(len(chunk) for chunk in audio) // 2
    assert abs(total / 24000 - end["audio_seconds"]) < 1e-3
    assert 0 < end["first_audio_seconds"] <= end["seconds_taken"]


def test_a_long_text_streams_as_it_clones_with_earlier_pieces_as_context(server):
    """REST and WebSocket take the long-form fields alike and give the same audio for a seed."""
    import websockets

    fields = clone_form(target_text="مرحبا بكم، كيف حالكم؟ " * 10, context_pieces="1", context_positions="2048")
    body = {**fields, "reference_audio_base64": base64.b64encode(REFERENCE.read_bytes()).decode()}
    response = httpx.post(f"{server}/v1/clone", headers=AUTH, json=body, timeout=120)
    assert response.status_code == 200, response.text
    whole, _ = sf.read(io.BytesIO(response.content), dtype="int16")

    async def run():
        async with websockets.connect(server.replace("http", "ws") + f"/v1/stream?token={TOKEN}") as ws:
            await ws.send(json.dumps(body))
            return [message async for message in ws]

    messages = asyncio.run(run())
    end = json.loads(messages[-1])
    assert end["type"] == "end" and end["context_pieces"] == [0, 1]  # two pieces, the second saw the first
    streamed = np.frombuffer(b"".join(m for m in messages if isinstance(m, bytes)), dtype="<i2")
    assert len(streamed) == len(whole)
    # 2 LSB: the wav rounds to PCM16, the stream truncates; beyond that the streamed decode's own 1e-3 of peak.
    assert np.abs(streamed.astype(int) - whole).max() <= 1e-3 * max(int(np.abs(whole).max()), 1) + 2
    refused = httpx.post(f"{server}/v1/clone", headers=AUTH, json={**body, "context_pieces": -1}, timeout=60)
    assert refused.status_code == 422 and "context_pieces=-1" in refused.json()["detail"]


def test_sixteen_concurrent_requests_all_succeed(server):
    body = {**clone_form(), "reference_audio_base64": base64.b64encode(REFERENCE.read_bytes()).decode()}

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(
                *[client.post(f"{server}/v1/clone", headers=AUTH, json={**body, "seed": i}) for i in range(16)]
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 16
    for response in responses:
        samples, rate = sf.read(io.BytesIO(response.content))
        assert rate == 24000 and len(samples) > 0


def test_limits_and_access_get_the_right_4xx(server, tmp_path):
    audio = REFERENCE.read_bytes()
    form = clone_form()

    def post(files=None, data=None, json_body=None, headers=AUTH):
        return httpx.post(f"{server}/v1/clone", headers=headers, files=files, data=data, json=json_body, timeout=60)

    big = io.BytesIO()
    sf.write(big, np.zeros(24000 * 30, dtype=np.float32), 24000, format="WAV", subtype="PCM_16")  # 1.4 MB > 1 MB
    cases = {
        "oversize upload": (post(files={"reference_audio": ("a.wav", big.getvalue())}, data=form), 413),
        "non-audio upload": (post(files={"reference_audio": ("a.wav", b"this is not audio" * 10)}, data=form), 422),
        "empty text": (post(files={"reference_audio": ("a.flac", audio)}, data={**form, "target_text": " "}), 422),
        "huge text": (post(files={"reference_audio": ("a.flac", audio)}, data={**form, "target_text": "ب" * 301}), 422),
        "server path as audio": (post(json_body={**form, "reference_audio": str(REFERENCE)}), 422),
        "server path in a form field": (post(data={**form, "reference_audio": "/etc/passwd"}), 422),
        "wrong token": (
            post(files={"reference_audio": ("a.flac", audio)}, data=form, headers={"Authorization": "Bearer wrong"}),
            401,
        ),
        "no token": (post(files={"reference_audio": ("a.flac", audio)}, data=form, headers={}), 401),
    }
    small = io.BytesIO()  # 15 s of noise at 8 kHz: small in bytes, over the 12 s limit
    sf.write(
        small,
        np.random.default_rng(0).normal(0, 0.1, 8000 * 15).astype(np.float32),
        8000,
        format="WAV",
        subtype="PCM_16",
    )
    cases["reference too long"] = (post(files={"reference_audio": ("a.wav", small.getvalue())}, data=form), 422)
    for name, (response, status) in cases.items():
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        assert response.json()["detail"], name
    assert "never reads" in cases["server path as audio"][0].json()["detail"]
