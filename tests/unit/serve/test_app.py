"""The app in process on the tiny model (Starlette's TestClient): what is refused at the edge and how, what is
public with a token, WebSocket close codes; each refusal names its reason."""

import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf

from higgs_lora.infer.cloner import VoiceCloner
from higgs_lora.serve.app import create_app
from higgs_lora.serve.inputs import ServeSettings
from higgs_lora.tiny import REPO_ROOT

REFERENCE = REPO_ROOT / "examples" / "demo_corpus" / "spk_f1" / "spk_f1_01.flac"
REFERENCE_TEXT = "تشرب الجدة الشاي في الحديقة"
TOKEN = "unit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG_TEXT = "مرحبا بكم، كيف حالكم اليوم؟ " * 24
"""Cut into 3 or more pieces of at most 200 characters."""
SETTINGS = ServeSettings(max_upload_bytes=2**20, max_reference_seconds=12, token=TOKEN, idle_seconds=0.5)


@pytest.fixture(scope="module")
def cloner(tiny_checkpoint):
    return VoiceCloner.load(tiny_checkpoint.model_dir, device="cpu", dtype="fp32", max_batch=4)


@pytest.fixture(scope="module")
def client(cloner):
    from starlette.testclient import TestClient

    with TestClient(create_app(cloner, SETTINGS)) as test_client:
        yield test_client


def body(**fields) -> dict:
    return {
        "reference_audio_base64": base64.b64encode(REFERENCE.read_bytes()).decode(),
        "reference_text": REFERENCE_TEXT,
        "target_text": "مرحبا بكم",
        "max_seconds": 0.4,
        "seed": 1,
        **fields,
    }


def post_raw(client, data: bytes, content_type="application/json", headers=AUTH):
    return client.post("/v1/clone", content=data, headers={**headers, "content-type": content_type})


def test_texts_must_be_proper_unicode_strings(client):
    lone = json.dumps(body()).replace('"target_text": "', '"target_text": "\\ud800', 1).encode()
    cases = {
        "lone surrogate": post_raw(client, lone),
        "object as text": client.post("/v1/clone", headers=AUTH, json=body(target_text={"a": 1})),
        "number as reference text": client.post("/v1/clone", headers=AUTH, json=body(reference_text=5)),
        "list as adapter": client.post("/v1/clone", headers=AUTH, json=body(adapter=["x"])),
        "deeply nested": post_raw(client, b'{"target_text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "not JSON": post_raw(client, b"\xff\xfe{"),
        "number field as object": client.post("/v1/clone", headers=AUTH, json=body(seed={"a": 1})),
    }
    for name, response in cases.items():
        assert response.status_code == 422, f"{name}: {response.status_code} {response.text}"
        assert response.json()["detail"], name
    assert "surrogate" in cases["lone surrogate"].json()["detail"]
    assert cases["object as text"].json()["detail"] == "target_text must be a string, not dict"
    assert client.post("/v1/clone", headers=AUTH, json=body()).status_code == 200  # and the server still clones


def test_audio_is_refused_from_its_header_before_decoding(client, monkeypatch):
    import soundfile

    long_silence = io.BytesIO()  # 20 minutes of silence at 8 kHz: a small FLAC, 19 M samples decoded
    sf.write(long_silence, np.zeros(8000 * 1200, dtype=np.int16), 8000, format="FLAC")
    assert len(long_silence.getvalue()) < SETTINGS.max_upload_bytes
    reads = []
    real_read = soundfile.read
    monkeypatch.setattr(soundfile, "read", lambda *a, **k: reads.append(k) or real_read(*a, **k))
    files = {"reference_audio": ("a.flac", long_silence.getvalue(), "audio/flac")}
    data = {"reference_text": REFERENCE_TEXT, "target_text": "مرحبا"}
    response = client.post("/v1/clone", headers=AUTH, files=files, data=data)
    assert response.status_code == 422 and response.json()["detail"] == "reference audio is 1200.0 s; the limit is 12 s"
    assert reads == []  # refused from sf.info alone
    ok = client.post("/v1/clone", headers=AUTH, json=body())
    assert (
        ok.status_code == 200 and len(reads) == 1 and reads[0]["frames"] == 12 * sf.info(REFERENCE).samplerate + 1
    )  # decoding is bounded


def test_bodies_over_the_limit_are_refused_while_they_stream(client):
    sent = []

    def chunks(head: bytes, size: int):
        yield head
        for _ in range(size // 65536):
            sent.append(65536)
            yield b"A" * 65536

    limit = SETTINGS.max_body_bytes
    json_head = b'{"target_text": "x", "reference_audio_base64": "'
    response = post_raw(client, chunks(json_head, 8 * limit))  # a generator: chunked transfer encoding
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    boundary = "b0undary"
    part_head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="reference_audio"; filename="a.wav"\r\n\r\n'
    ).encode()
    sent.clear()
    response = post_raw(client, chunks(part_head, 8 * limit), f"multipart/form-data; boundary={boundary}")
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    declared = client.post("/v1/clone", headers={**AUTH, "content-length": str(limit + 1)}, content=b"x" * (limit + 1))
    assert declared.status_code == 413


def test_with_a_token_only_a_bare_liveness_answer_is_public(client):
    assert client.get("/health").json() == {"status": "ok"}
    full = client.get("/health", headers=AUTH).json()
    assert full["status"] == "ok" and "model" in full and full["max_pending"] == 8 * 4  # sized from max_batch 4
    assert client.get("/openapi.json").status_code == 401
    assert "/v1/clone" in client.get("/openapi.json", headers=AUTH).json()["paths"]
    assert client.get("/docs", headers=AUTH).status_code == 404 and client.get("/redoc").status_code == 401


def test_audio_budget_defaults_and_its_maximum(client):
    too_much = client.post("/v1/clone", headers=AUTH, json=body(max_total_seconds=SETTINGS.max_audio_seconds + 1))
    assert too_much.status_code == 422 and "over the server's limit" in too_much.json()["detail"]
    piece = client.post("/v1/clone", headers=AUTH, json=body(max_seconds=601))
    assert piece.status_code == 422 and "max_seconds=601" in piece.json()["detail"]
    text = LONG_TEXT
    spent = client.post("/v1/clone", headers=AUTH, json=body(target_text=text, max_total_seconds=0.5))
    assert spent.status_code == 200, spent.text
    assert float(spent.headers["X-Audio-Seconds"]) <= 0.5 + 3 * 0.15 + 0.05  # the budget and the pauses


def test_websocket_close_codes(client):
    from starlette.websockets import WebSocketDisconnect

    def closed(path, send=None):
        with client.websocket_connect(path) as ws:
            if send is not None:
                ws.send_bytes(send) if isinstance(send, bytes) else ws.send_text(send)
            with pytest.raises(WebSocketDisconnect) as info:
                while True:
                    ws.receive_json()
        return info.value.code, info.value.reason

    assert closed("/v1/stream") == (1008, "missing or wrong bearer token")
    code, reason = closed(f"/v1/stream?token={TOKEN}", b"\x00\x01binary")
    assert code == 1003 and "JSON text" in reason
    code, reason = closed(f"/v1/stream?token={TOKEN}")  # sends nothing: closed after idle_seconds
    assert code == 1008 and reason == "no request within 0.5 s"
    code, reason = closed(f"/v1/stream?token={TOKEN}", "[" * 100_000)
    assert code == 1008 and "nested too deeply" in reason


def test_the_budget_cuts_the_last_piece_and_skips_the_rest(cloner):
    from higgs_lora.infer.sampling import SamplingParams

    text = LONG_TEXT
    params = SamplingParams(max_seconds=0.4, max_total_seconds=0.6, seed=1, temperature=0)
    result = cloner.clone(str(REFERENCE), REFERENCE_TEXT, text, params)
    unlimited = cloner.clone(
        str(REFERENCE), REFERENCE_TEXT, text, SamplingParams(max_seconds=0.4, seed=1, temperature=0)
    )
    assert len(result.pieces) == len(result.stops) == len(unlimited.stops) >= 3
    assert result.frames <= 0.6 * 25 < unlimited.frames
    assert result.stops[-1] == "budget" and unlimited.stops.count("budget") == 0
