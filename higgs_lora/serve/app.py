"""REST and WebSocket server over the inference core: `python -m higgs_lora.serve --model DIR [--adapter ...]`.

- `POST /v1/clone`: multipart (`reference_audio` file + `reference_text`, `target_text`, optional sampling fields)
  or JSON (`reference_audio_base64` + the same fields) -> `audio/wav` (24 kHz mono PCM16); timing in headers.
- `WS /v1/stream`: the client sends one JSON request (as the JSON body above); the server answers
  `{"type": "start", ...}`, binary PCM16 chunks as they are generated, then `{"type": "end", ...timing}`; or
  `{"type": "error", "status": 4xx, "detail": ...}` and closes.
- `GET /health` (503 when the batch worker died or is stuck), `GET /v1/adapters`; OpenAPI docs at `/docs`.
- `GET /`: a page to try cloning (`static/index.html`: no framework; its API calls carry the token).

Limits answer with clear 4xx (`serve.inputs` checks a request at the edge): a body over the upload limit 413 while
it streams in; audio that is not audio or whose header says it is over `max_reference_seconds`, texts that are not
proper Unicode strings, an empty target text or one over `max_text_chars`, more audio than `max_audio_seconds`, a
path or URL given instead of audio bytes 422 (the server never opens a file or URL a request names); a full queue
429 with Retry-After; a missing or wrong bearer token (when the server has one) 401, and then only a bare `/health`
is public. Decoding and encoding references run on helper threads, the model on `batch_queue.BatchQueue`'s worker,
which interleaves the pieces of long texts between requests.
"""

import argparse
import asyncio
import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from higgs_lora import startup
from higgs_lora.constants import SAMPLE_RATE
from higgs_lora.data.audio import wav_bytes
from higgs_lora.infer.cloner import CloneRequest, InferenceError, VoiceCloner
from higgs_lora.logs import get_logger, is_quiet
from higgs_lora.serve.batch_queue import BatchFailed, BatchQueue, QueueFull, Unavailable
from higgs_lora.serve.inputs import (
    BodyLimit,
    RequestError,
    ServeSettings,
    audio_bytes_from_json,
    check_texts,
    decode_audio,
    parse_json,
    sampling_params,
)

log = get_logger("serve")

TOKEN_ENV = "HIGGS_LORA_TOKEN"
PAGE = Path(__file__).with_name("static") / "index.html"
PUBLIC_PATHS = ("/health", "/")
PREPARE_THREADS = 2
"""Threads that decode and encode reference audio, off the event loop (the model has its own worker thread)."""


def build_request(cloner: VoiceCloner, settings: ServeSettings, body: dict, audio: bytes) -> CloneRequest:
    """A checked `CloneRequest` from form/JSON fields and the reference audio's bytes (RequestError otherwise).

    Blocking work (decoding, the codec): run it off the event loop."""
    check_texts(body)
    target, reference_text = body.get("target_text") or "", body.get("reference_text") or ""
    if not target.strip():
        raise RequestError(422, "target_text is empty")
    if len(target) > settings.max_text_chars:
        raise RequestError(422, f"target_text has {len(target)} characters; the limit is {settings.max_text_chars}")
    params = sampling_params(body, settings)
    adapter = body.get("adapter") or (cloner.adapters[0] if cloner.adapters else None)
    if adapter in ("base", "none"):
        adapter = None
    samples, rate = decode_audio(audio, settings)
    request = CloneRequest(samples, rate, reference_text, target, params, adapter, body.get("scene"))
    try:
        cloner.prepare(request)
    except InferenceError as err:
        raise RequestError(422, str(err)) from None
    return request


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def create_app(cloner: VoiceCloner, settings: ServeSettings | None = None):
    """The FastAPI application (its batch queue starts with the app and stops with it)."""
    settings = settings or ServeSettings()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
    from fastapi.responses import JSONResponse, Response

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["queue"] = BatchQueue(
            cloner, settings.pending_limit(cloner.max_batch), settings.batch_wait_seconds, settings.stall_seconds
        )
        state["prepare"] = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="higgs-lora-prepare")
        yield
        state["queue"].close()
        state["prepare"].shutdown(wait=False, cancel_futures=True)

    public_docs = settings.token is None  # with a token only a bare liveness answer is public
    app = FastAPI(
        title="higgs-lora voice cloning",
        version="0.1.0",
        lifespan=lifespan,
        description="Zero-shot Arabic voice cloning with Higgs Audio v2 (+ LoRA adapters).",
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def authorised(header: str | None, query: str | None = None) -> bool:
        if settings.token is None:
            return True
        given = query or (header[7:] if header and header.startswith("Bearer ") else "")
        return hmac.compare_digest(given.encode(), settings.token.encode())

    @app.exception_handler(RequestError)
    async def refused(_, err: RequestError):
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # Public with a token set: the bare liveness answer and the static page (it holds no data; its API calls
        # carry the token the user types into it).
        if request.url.path not in PUBLIC_PATHS and not authorised(request.headers.get("authorization")):
            return JSONResponse(
                {"detail": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return await call_next(request)

    async def prepared(body: dict, audio: bytes) -> CloneRequest:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(state["prepare"], build_request, cloner, settings, body, audio)

    @app.get("/health")
    async def health(request: Request):
        """Liveness: 200 while the batch worker runs and makes progress, else 503 (details need the token)."""
        ok, why = state["queue"].health()
        answer: dict = {"status": "ok" if ok else "unavailable"}
        if authorised(request.headers.get("authorization")):
            answer.update(cloner.describe(), pending=state["queue"].pending, max_pending=state["queue"].max_pending)
            if not ok:
                answer["detail"] = why
        return JSONResponse(answer, status_code=200 if ok else 503)

    @app.get("/", include_in_schema=False)
    async def page():
        from fastapi.responses import HTMLResponse

        return HTMLResponse(PAGE.read_text(encoding="utf-8"))  # public: it holds no data, the API needs the token

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
        clone_request = await prepared(body, audio)
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
        await websocket.accept()  # then close with a code: refusing the handshake would be an HTTP 403
        if not authorised(websocket.headers.get("authorization"), websocket.query_params.get("token")):
            await websocket.close(code=1008, reason="missing or wrong bearer token")
            return
        try:
            try:
                message = await asyncio.wait_for(websocket.receive(), timeout=settings.idle_seconds)
            except TimeoutError:
                await websocket.close(code=1008, reason=f"no request within {settings.idle_seconds:g} s")
                return
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is None:
                await websocket.close(code=1003, reason="send the request as one JSON text message, not binary")
                return
            body = parse_json(message["text"])
            clone_request = await prepared(body, audio_bytes_from_json(body, settings))
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
            await websocket.close(code=1008 if err.status < 500 else 1011, reason=err.detail[:120])
        except WebSocketDisconnect:
            pass

    return app


async def _read_body(request, settings: ServeSettings) -> tuple[dict, bytes]:
    """Fields and the reference audio's bytes of a multipart or JSON request (the body limit is enforced while it
    streams in, by `BodyLimit`)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        body = parse_json(await request.body())
        return body, audio_bytes_from_json(body, settings)
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(422, "send multipart/form-data (reference_audio file) or application/json")
    from starlette.exceptions import HTTPException

    try:
        form = await request.form(max_files=2, max_fields=32, max_part_size=settings.max_upload_bytes + 1)
    except HTTPException as err:
        raise RequestError(413 if "exceeded" in str(err.detail) else 422, str(err.detail)) from None
    upload = form.get("reference_audio")
    if upload is None or isinstance(upload, str):
        raise RequestError(422, "reference_audio must be an uploaded file; the server never reads a path or URL")
    data = await upload.read(settings.max_upload_bytes + 1)
    await form.close()
    body = {k: v for k, v in form.items() if isinstance(v, str)}
    return body, data


async def _run(batch_queue: BatchQueue, request: CloneRequest):
    """Submit `request` and yield its chunks, then its result (RequestError 429 when the queue is full, 503 when
    the worker stopped, 500 when its batch failed)."""
    try:
        ticket = batch_queue.submit(request)
    except QueueFull as err:
        raise RequestError(429, str(err), headers={"Retry-After": str(batch_queue.retry_after())}) from None
    except Unavailable as err:
        raise RequestError(503, str(err)) from None
    finished = False
    try:
        while True:
            try:
                item = await asyncio.wait_for(ticket.chunks.get(), timeout=1.0)
            except TimeoutError:
                if not batch_queue.alive and ticket.chunks.empty():
                    raise RequestError(503, batch_queue.health()[1] or "the server is shutting down") from None
                continue
            if isinstance(item, Exception):
                finished = True
                status = 422 if isinstance(item, InferenceError) else 503 if isinstance(item, Unavailable) else 500
                raise RequestError(
                    status, str(item) if isinstance(item, (BatchFailed, InferenceError, Unavailable)) else repr(item)
                )
            yield item
            if not isinstance(item, np.ndarray):
                finished = True
                return
    finally:
        if not finished:
            ticket.cancelled = True


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
        audio_seconds=args.audio_seconds,
        max_audio_seconds=args.max_audio_seconds,
        idle_seconds=args.idle_seconds,
        header_seconds=args.header_seconds,
        drain_seconds=args.drain_seconds,
        token=token,
    )
    if settings.audio_seconds > settings.max_audio_seconds:
        raise InferenceError(
            f"--audio-seconds {settings.audio_seconds:g} is over --max-audio-seconds {settings.max_audio_seconds:g}"
        )
    import uvicorn

    from higgs_lora.serve.protocol import header_timeout_protocol

    cloner = load_cloner(args)
    pending = settings.pending_limit(cloner.max_batch)
    log.info(f"{cloner.describe()} on http://{args.host}:{args.port} (queue {pending}; docs at /docs)")
    config = uvicorn.Config(
        create_app(cloner, settings),
        host=args.host,
        port=args.port,
        log_level="warning" if is_quiet() else "info",
        http=header_timeout_protocol(settings.header_seconds),
        ws_max_size=settings.max_body_bytes,
        timeout_keep_alive=int(settings.idle_seconds),
        timeout_graceful_shutdown=settings.drain_seconds,
        h11_max_incomplete_event_size=64 * 1024,
    )
    uvicorn.Server(config).run()
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
    parser.add_argument(
        "--max-pending", type=int, default=None, help="requests queued or running before 429 (default: 8 x --max-batch)"
    )
    parser.add_argument(
        "--audio-seconds",
        type=float,
        default=defaults.audio_seconds,
        help="audio budget of a request without max_total_seconds (all its pieces together)",
    )
    parser.add_argument(
        "--max-audio-seconds",
        type=float,
        default=defaults.max_audio_seconds,
        help="most audio a request may ask for (max_total_seconds, max_seconds); more is 422",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=defaults.idle_seconds,
        help="WebSocket without a request, idle keep-alive connection: closed after this long",
    )
    parser.add_argument(
        "--header-seconds",
        type=float,
        default=defaults.header_seconds,
        help="a connection that has not sent a complete request head within this long is closed",
    )
    parser.add_argument(
        "--drain-seconds",
        type=int,
        default=defaults.drain_seconds,
        help="on SIGTERM, how long running requests may take to finish before the server exits",
    )
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: _serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
