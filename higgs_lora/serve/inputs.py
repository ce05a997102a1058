"""What the server accepts from a request, checked at the edge before any model work: the settings that bound it,
the body read under its byte limit whatever the transfer encoding, JSON within a nesting depth, texts that are
proper Unicode strings, and reference audio refused from its header before it is decoded.

May import the inference core's request types; nothing of the app. See docs/inference.md#server.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, fields

import numpy as np

from higgs_lora.infer.sampling import SamplingParams

TEXT_FIELDS = ("target_text", "reference_text", "adapter", "scene")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access of the server."""

    max_upload_bytes: int = 10 * 2**20
    """Largest reference audio upload (bytes, after base64 decoding)."""
    max_reference_seconds: float = 30.0
    """Longest reference recording accepted, in seconds."""
    max_text_chars: int = 2000
    """Longest target text, in characters (long texts are spoken sentence by sentence)."""
    max_pending: int | None = None
    """Requests queued or running at once; more get 429 with Retry-After. None: `PENDING_PER_BATCH` x max batch."""
    batch_wait_seconds: float = 0.02
    """How long the queue waits for more requests to batch with the first one."""
    audio_seconds: float = 60.0
    """Audio budget of a request that gives no `max_total_seconds`: all pieces of its text together, in seconds."""
    max_audio_seconds: float = 300.0
    """Most audio one request may ask for (`max_total_seconds`, and `max_seconds` of one piece); more is 422."""
    token: str | None = None
    """Bearer token every request must carry; None: no authentication (bind to loopback then)."""
    idle_seconds: float = 30.0
    """A WebSocket that sends no request within this long is closed (1008); also the HTTP keep-alive timeout."""
    header_seconds: float = 10.0
    """A connection that has not sent a complete request head within this long is closed."""
    stall_seconds: float = 300.0
    """A busy batch worker that makes no progress for this long makes /health answer 503."""
    drain_seconds: int = 60
    """On SIGTERM: how long running requests may take to finish before the server exits anyway."""

    def pending_limit(self, max_batch: int) -> int:
        return self.max_pending if self.max_pending is not None else PENDING_PER_BATCH * max_batch

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the audio limit in base64 plus room for the other fields."""
        return self.max_upload_bytes * 4 // 3 + 2**16


PENDING_PER_BATCH = 8
"""Default queue: this many full batches queued or running (64 requests for `--max-batch 8`)."""


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class BodyLimit:
    """ASGI middleware: an HTTP request body over `limit` bytes is refused with 413 as soon as it is, whatever the
    transfer encoding (Content-Length is checked first, a chunked body while it streams), so nothing buffers more."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await _refuse(send, 413, f"request body is {int(length)} bytes; the limit is {self.limit}")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestError(413, f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def parse_json(data: bytes | str) -> dict:
    """One JSON object (RequestError 422 otherwise, also for nesting too deep for the parser)."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as err:
        why = "it is nested too deeply" if isinstance(err, RecursionError) else "body is not valid JSON (UTF-8)"
        raise RequestError(422, why if not isinstance(err, RecursionError) else f"JSON refused: {why}") from None
    if not isinstance(body, dict):
        raise RequestError(422, "send one JSON object")
    return body


def check_texts(body: dict) -> None:
    """The text fields are strings of proper Unicode (no lone surrogates); RequestError 422 names the field."""
    for name in TEXT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RequestError(422, f"{name} must be a string, not {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(
                422, f"{name} is not valid Unicode text (character {err.start} is a lone surrogate)"
            ) from None


def sampling_params(body: dict, settings: ServeSettings) -> SamplingParams:
    """The request's sampling fields, with its audio budget defaulted and capped by the server's settings."""
    known = {f.name: str(f.type) for f in fields(SamplingParams)}  # "int", "int | None", "float"
    values = {}
    for name, value in body.items():
        if name in known and value not in (None, ""):
            kind = int if known[name].startswith("int") else float
            if isinstance(value, (dict, list, bool)):
                raise RequestError(422, f"{name} must be a number")
            try:
                values[name] = kind(value)
            except (TypeError, ValueError, OverflowError):
                raise RequestError(422, f"{name}={str(value)[:40]!r} is not a number") from None
    values.setdefault("max_total_seconds", settings.audio_seconds)
    limit = settings.max_audio_seconds
    for name in ("max_total_seconds", "max_seconds"):
        if name in values and values[name] > limit:
            raise RequestError(422, f"{name}={values[name]} is over the server's limit of {limit:g} s of audio")
    return SamplingParams(**values)


def decode_audio(data: bytes, settings: ServeSettings) -> tuple[np.ndarray, int]:
    """Mono samples and rate of an uploaded recording; its length is read from the header and refused before the
    samples are decoded (and decoding never reads past the limit, whatever the header says)."""
    import soundfile as sf

    if len(data) > settings.max_upload_bytes:
        raise RequestError(413, f"reference audio is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
    if not data:
        raise RequestError(422, "reference audio is empty")
    not_audio = RequestError(422, "reference audio is not a readable audio file (wav, flac, ogg or mp3)")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise not_audio from None
    if info.samplerate <= 0 or info.channels <= 0 or info.channels > 16:
        raise not_audio
    limit = settings.max_reference_seconds
    if info.frames / info.samplerate > limit:
        raise RequestError(422, f"reference audio is {info.frames / info.samplerate:.1f} s; the limit is {limit:.0f} s")
    most = int(limit * info.samplerate) + 1
    try:
        samples, rate = sf.read(io.BytesIO(data), frames=most, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise not_audio from None
    if len(samples) / rate > limit:
        raise RequestError(422, f"reference audio is over the limit of {limit:.0f} s")
    if not len(samples):
        raise RequestError(422, "reference audio holds no samples")
    return samples.mean(axis=1), int(rate)


def audio_bytes_from_json(body: dict, settings: ServeSettings) -> bytes:
    """The reference audio of a JSON request: base64 bytes only, never a path or URL."""
    value = body.get("reference_audio_base64")
    if value is None and isinstance(body.get("reference_audio"), str):
        raise RequestError(
            422,
            "reference_audio must be uploaded (multipart) or sent as reference_audio_base64; "
            "the server never reads a file or URL named in a request",
        )
    if not isinstance(value, str):
        raise RequestError(422, "missing reference_audio_base64 (a base64 string)")
    if len(value) > settings.max_upload_bytes * 4 // 3 + 4:
        raise RequestError(413, f"reference audio is larger than {settings.max_upload_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "reference_audio_base64 is not valid base64") from None
