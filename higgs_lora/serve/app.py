"""REST and WebSocket server over the inference core: `python -m higgs_lora.serve --model DIR [--adapter ...]`.

- `POST /v1/clone`: multipart (`reference_audio` file + `reference_text`, `target_text`, optional sampling fields)
  or JSON (`reference_audio_base64` + the same fields) -> `audio/wav` (24 kHz mono PCM16); timing in headers.
- `WS /v1/stream`: the client sends one JSON request (as the JSON body above); the server answers
  `{"type": "start", ...}`, binary PCM16 chunks as they are generated, then `{"type": "end", ...timing}`; or
  `{"type": "error", "status": 4xx, "detail": ...}` and closes.
- `GET /health`, `GET /v1/adapters`; OpenAPI docs at `/docs`.

Limits answer with clear 4xx: an upload over `max_upload_bytes` 413; audio that is not audio, a reference over
`max_reference_seconds`, an empty target text or one over `max_text_chars`, a path or URL given instead of audio
bytes 422 (the server never opens a file or URL a request names); more than `max_pending` requests queued or
running 429; a missing or wrong bearer token (when the server has one) 401. Requests are batched by
`batching.BatchQueue`.
"""

import argparse
import base64
import binascii
import hmac
import io
import os
from dataclasses import dataclass, fields

import numpy as np

from higgs_lora import startup
from higgs_lora.constants import SAMPLE_RATE
from higgs_lora.data.audio import wav_bytes
from higgs_lora.infer.cloner import CloneRequest, InferenceError, VoiceCloner
from higgs_lora.infer.sampling import SamplingParams
from higgs_lora.logs import get_logger, is_quiet
from higgs_lora.serve.batch_queue import BatchQueue, QueueFull

log = get_logger("serve")

TOKEN_ENV = "HIGGS_LORA_TOKEN"


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access of the server."""

    max_upload_bytes: int = 10 * 2**20
    """Largest reference audio upload (bytes, after base64 decoding)."""
    max_reference_seconds: float = 30.0
    """Longest reference recording accepted, in seconds."""
    max_text_chars: int = 2000
    """Longest target text, in characters (long texts are spoken sentence by sentence)."""
    max_pending: int = 32
    """Requests queued or running at once; more get 429."""
    batch_wait_seconds: float = 0.02
    """How long the queue waits for more requests to batch with the first one."""
    token: str | None = None
    """Bearer token every request must carry; None: no authentication (bind to loopback then)."""


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _decode_audio(data: bytes, settings: ServeSettings) -> tuple[np.ndarray, int]:
    import soundfile as sf

    if len(data) > settings.max_upload_bytes:
        raise RequestError(413, f"reference audio is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
    if not data:
        raise RequestError(422, "reference audio is empty")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise RequestError(422, "reference audio is not a readable audio file (wav, flac, ogg or mp3)") from None
    seconds = len(samples) / rate
    if seconds > settings.max_reference_seconds:
        raise RequestError(
            422, f"reference audio is {seconds:.1f} s; the limit is {settings.max_reference_seconds:.0f} s"
        )
    return samples.mean(axis=1), int(rate)


def _audio_from_json(body: dict, settings: ServeSettings) -> tuple[np.ndarray, int]:
    """The reference audio of a JSON request: base64 bytes only, never a path or URL."""
    value = body.get("reference_audio_base64")
    if value is None and isinstance(body.get("reference_audio"), str):
        raise RequestError(
            422,
            "reference_audio must be uploaded (multipart) or sent as reference_audio_base64; "
            "the server never reads a file or URL named in a request",
        )
    if not isinstance(value, str):
        raise RequestError(422, "missing reference_audio_base64")
    if len(value) > settings.max_upload_bytes * 4 // 3 + 4:
        raise RequestError(413, f"reference audio is larger than {settings.max_upload_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "reference_audio_base64 is not valid base64") from None
    return _decode_audio(data, settings)


def _params(body: dict) -> SamplingParams:
    known = {f.name: str(f.type) for f in fields(SamplingParams)}  # "int", "int | None", "float"
    values = {}
    for name, value in body.items():
        if name in known and value not in (None, ""):
            kind = int if known[name].startswith("int") else float
            try:
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise RequestError(422, f"{name}={value!r} is not a number") from None
    return SamplingParams(**values)


def build_request(
    cloner: VoiceCloner, settings: ServeSettings, body: dict, audio: tuple[np.ndarray, int]
) -> CloneRequest:
    """A checked `CloneRequest` from form/JSON fields and decoded reference audio (RequestError otherwise)."""
    target, reference_text = str(body.get("target_text") or ""), str(body.get("reference_text") or "")
    if not target.strip():
        raise RequestError(422, "target_text is empty")
    if len(target) > settings.max_text_chars:
        raise RequestError(422, f"target_text has {len(target)} characters; the limit is {settings.max_text_chars}")
    adapter = body.get("adapter") or (cloner.adapters[0] if cloner.adapters else None)
    if adapter in ("base", "none"):
        adapter = None
    scene = body.get("scene")
    if scene is not None and not isinstance(scene, str):
        raise RequestError(422, "scene must be a string ('' for no scene, 'none' for no system turn)")
    request = CloneRequest(audio[0], audio[1], reference_text, target, _params(body), adapter, scene)
    try:
        cloner.prepare(request)
    except InferenceError as err:
        raise RequestError(422, str(err)) from None
    return request


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def create_app(cloner: VoiceCloner, settings: ServeSettings = ServeSettings()):
    """The FastAPI application (its batch queue starts with the app and stops with it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
    from fastapi.responses import JSONResponse, Response

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["queue"] = BatchQueue(cloner, settings.max_pending, settings.batch_wait_seconds)
        yield
        state["queue"].close()

    app = FastAPI(
        title="higgs-lora voice cloning",
        version="0.1.0",
        lifespan=lifespan,
        description="Zero-shot Arabic voice cloning with Higgs Audio v2 (+ LoRA adapters).",
    )

    def authorised(header: str | None, query: str | None = None) -> bool:
        if settings.token is None:
            return True
        given = query or (header[7:] if header and header.startswith("Bearer ") else "")
        return hmac.compare_digest(given.encode(), settings.token.encode())

    @app.exception_handler(RequestError)
    async def refused(_, err: RequestError):
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not authorised(request.headers.get("authorization")):
            return JSONResponse(
                {"detail": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_bytes * 4 // 3 + 2**16:
            return JSONResponse(
                {"detail": f"request body is {length} bytes; the audio limit is {settings.max_upload_bytes}"},
                status_code=413,
            )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", **cloner.describe(), "pending": state["queue"].pending}

    @app.get("/v1/adapters")
    async def adapters():
        return {"adapters": cloner.adapters, "default": cloner.adapters[0] if cloner.adapters else None}

    @app.post(
        "/v1/clone",
        response_class=Response,
        responses={200: {"content": {"audio/wav": {}}, "description": "24 kHz mono PCM16 WAV"}},
    )
    async def clone(request: Request):
        """Clone a voice: multipart form with a `reference_audio` file, or JSON with `reference_audio_base64`."""
        body, audio = await _read_body(request, settings)
        clone_request = build_request(cloner, settings, body, audio)
        result = None
        async for item in _run(state["queue"], clone_request):
            if not isinstance(item, np.ndarray):
                result = item
        headers = {
            "X-Audio-Seconds": f"{result.duration:.3f}",
            "X-Seconds-Taken": f"{result.seconds_taken:.3f}",
            "X-Real-Time-Factor": f"{result.real_time_factor:.4f}",
            "X-Seed": str(result.seed),
        }
        return Response(wav_bytes(result.waveform, result.sample_rate), media_type="audio/wav", headers=headers)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket):
        if not authorised(websocket.headers.get("authorization"), websocket.query_params.get("token")):
            await websocket.close(code=1008, reason="missing or wrong bearer token")
            return
        await websocket.accept()
        try:
            body = await websocket.receive_json()
            if not isinstance(body, dict):
                raise RequestError(422, "send one JSON object")
            clone_request = build_request(cloner, settings, body, _audio_from_json(body, settings))
            await websocket.send_json(
                {"type": "start", "sample_rate": SAMPLE_RATE, "format": "pcm_s16le", "channels": 1}
            )
            chunks = 0
            async for item in _run(state["queue"], clone_request):
                if isinstance(item, np.ndarray):
                    await websocket.send_bytes(pcm16(item))
                    chunks += 1
                else:
                    await websocket.send_json(
                        {
                            "type": "end",
                            "chunks": chunks,
                            "audio_seconds": round(item.duration, 3),
                            "seconds_taken": round(item.seconds_taken, 3),
                            "first_audio_seconds": round(item.first_audio_seconds or 0.0, 3),
                            "real_time_factor": round(item.real_time_factor, 4),
                            "seed": item.seed,
                            "stops": item.stops,
                            "context_pieces": item.context_pieces,
                        }
                    )
            await websocket.close()
        except RequestError as err:
            await websocket.send_json({"type": "error", "status": err.status, "detail": err.detail})
            await websocket.close(code=1008)
        except (WebSocketDisconnect, ValueError) as err:
            if not isinstance(err, WebSocketDisconnect):
                await websocket.send_json({"type": "error", "status": 422, "detail": f"bad message: {err}"})
                await websocket.close(code=1008)

    return app


async def _read_body(request, settings: ServeSettings) -> tuple[dict, tuple[np.ndarray, int]]:
    """Fields and decoded reference audio of a multipart or JSON request."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise RequestError(422, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(422, "send one JSON object")
        return body, _audio_from_json(body, settings)
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(422, "send multipart/form-data (reference_audio file) or application/json")
    form = await request.form(max_part_size=settings.max_upload_bytes + 1)
    upload = form.get("reference_audio")
    if upload is None or isinstance(upload, str):
        raise RequestError(422, "reference_audio must be an uploaded file; the server never reads a path or URL")
    data = await upload.read(settings.max_upload_bytes + 1)
    body = {k: v for k, v in form.items() if isinstance(v, str)}
    return body, _decode_audio(data, settings)


async def _run(batch_queue: BatchQueue, request: CloneRequest):
    """Submit `request` and yield its chunks, then its result (RequestError 429 when the queue is full)."""
    try:
        ticket = batch_queue.submit(request)
    except QueueFull as err:
        raise RequestError(429, str(err)) from None
    while True:
        item = await ticket.chunks.get()
        if isinstance(item, Exception):
            raise RequestError(422 if isinstance(item, InferenceError) else 500, str(item))
        yield item
        if not isinstance(item, np.ndarray):
            return


def _serve(args: argparse.Namespace) -> int:
    from higgs_lora.infer.options import load_cloner

    token = os.environ.get(TOKEN_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning(f"listening on {args.host} without a token; set {TOKEN_ENV} to require one")
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_reference_seconds=args.max_reference_seconds,
        max_text_chars=args.max_text_chars,
        max_pending=args.max_pending,
        token=token,
    )
    import uvicorn

    cloner = load_cloner(args)
    log.info(f"{cloner.describe()} on http://{args.host}:{args.port} (docs at /docs)")
    uvicorn.run(
        create_app(cloner, settings), host=args.host, port=args.port, log_level="warning" if is_quiet() else "info"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from higgs_lora.infer.options import add_model_arguments

    parser = argparse.ArgumentParser(prog="higgs-lora serve", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it: set a token)")
    parser.add_argument("--port", type=int, default=8000)
    defaults = ServeSettings()
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20)
    parser.add_argument("--max-reference-seconds", type=float, default=defaults.max_reference_seconds)
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars)
    parser.add_argument("--max-pending", type=int, default=defaults.max_pending)
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: _serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
