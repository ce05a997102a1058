"""Load on the server: many concurrent clients, mixed short and long texts, every client its own reference voice.

    python bench/serve_load.py                                  # CPU, the tiny model, 64 then 256 clients
    python bench/serve_load.py --model merged/ --clients 64 256 --max-batch 8   # a real model (a GPU machine)

Starts `python -m higgs_lora.serve` on loopback (a token set, default queue: 8 x --max-batch), then for each client
count sends that many requests at once: a quarter of them long texts (several sentence pieces), the rest short,
each with a distinct reference recording (a demo-corpus file with its own dither, so no reference is cached). A
client that gets 429 waits the Retry-After it was given and tries again. Meanwhile `/health` is polled every
0.2 s. Prints per client count: errors (anything but 200 after the retries), 429s, p50/p95/max latency (first
try to last byte), `/health` p50/max latency, and the server's RSS before, at peak and after. Temporary files
(the tiny model, the server's) live in one temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "demo_corpus"
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHORT = ["مرحبا بكم", "الطقس اليوم معتدل", "شكرا جزيلا لكم", "كيف حالك يا صديقي"]
LONG = "تشرب الجدة الشاي في الحديقة كل صباح، وتقرأ الجريدة بهدوء. " * 8


def references(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` distinct (base64 WAV, transcript) pairs: demo recordings, each with its own faint dither."""
    import soundfile as sf

    rows = [json.loads(line) for line in (CORPUS / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        row = rows[i % len(rows)]
        samples, rate = sf.read(str(CORPUS / row["audio"]), dtype="float32")
        samples = samples + rng.normal(0, 1e-4, samples.shape).astype(np.float32)
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
        out.append((base64.b64encode(buffer.getvalue()).decode(), row["text"]))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, max_batch: int, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "HIGGS_LORA_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "TMPDIR": str(workdir)}
    command = [sys.executable, "-m", "higgs_lora.serve", "--model", str(model), "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--quiet", *extra]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start in 600 s")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def one_client(client, body: dict, retries: int) -> tuple[float, int, int]:
    """(latency s, final status, 429s seen)."""
    started = time.perf_counter()
    refused = 0
    for _ in range(retries + 1):
        try:
            response = await client.post("/v1/clone", headers=AUTH, json=body)
        except Exception:  # noqa: BLE001 - a transport error is an error of this client
            return time.perf_counter() - started, -1, refused
        if response.status_code != 429:
            return time.perf_counter() - started, response.status_code, refused
        refused += 1
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
    return time.perf_counter() - started, 429, refused


async def load(url: str, clients: int, refs: list[tuple[str, str]], args) -> dict:
    import httpx

    bodies = []
    for i in range(clients):
        audio, text = refs[i % len(refs)]
        target = LONG if i % 4 == 0 else SHORT[i % len(SHORT)]
        bodies.append(
            {
                "reference_audio_base64": audio,
                "reference_text": text,
                "target_text": target,
                "max_seconds": args.max_seconds,
                "seed": i,
            }
        )
    health: list[float] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def poll(client):
        while not stop.is_set():
            started = time.perf_counter()
            await client.get("/health")
            health.append(time.perf_counter() - started)
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        poller = asyncio.create_task(poll(client))
        started = time.perf_counter()
        outcomes = await asyncio.gather(*[one_client(client, body, args.retries) for body in bodies])
        wall = time.perf_counter() - started
        stop.set()
        await poller
    latencies = [o[0] for o in outcomes if o[1] == 200]
    long_latencies = [o[0] for i, o in enumerate(outcomes) if o[1] == 200 and i % 4 == 0]
    short_latencies = [o[0] for i, o in enumerate(outcomes) if o[1] == 200 and i % 4 != 0]
    return {
        "clients": clients,
        "ok": len(latencies),
        "errors": sum(1 for o in outcomes if o[1] != 200),
        "error_statuses": sorted({o[1] for o in outcomes if o[1] != 200}),
        "answers_429": sum(o[2] for o in outcomes),
        "wall_s": round(wall, 2),
        "latency_p50_s": round(percentile(latencies, 50), 2),
        "latency_p95_s": round(percentile(latencies, 95), 2),
        "latency_max_s": round(max(latencies, default=float("nan")), 2),
        "short_p50_s": round(percentile(short_latencies, 50), 2),
        "long_p50_s": round(percentile(long_latencies, 50), 2),
        "health_p50_ms": round(1000 * percentile(health, 50), 1),
        "health_max_ms": round(1000 * max(health, default=float("nan")), 1),
        "health_polls": len(health),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the tiny model, built in a temporary directory)")
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=0.5, help="per piece of text")
    parser.add_argument("--retries", type=int, default=20, help="429 answers a client waits out before giving up")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    args = parser.parse_args(argv)

    import psutil
    import torch

    with tempfile.TemporaryDirectory(prefix="higgs-lora-serve-load-") as tmp:
        workdir = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            from higgs_lora.tiny import ensure_tiny

            model = ensure_tiny(workdir / "tiny").model_dir
        refs = references(max(args.clients))
        process, url = start_server(model, args.max_batch, workdir, args.server_arg)
        memory = psutil.Process(process.pid)
        results = []
        try:
            for clients in args.clients:
                rss_before = memory.memory_info().rss
                peak = [rss_before]

                async def measured(clients=clients, peak=peak):
                    async def sample():
                        while True:
                            peak[0] = max(peak[0], memory.memory_info().rss)
                            await asyncio.sleep(0.1)

                    sampler = asyncio.create_task(sample())
                    try:
                        return await load(url, clients, refs, args)
                    finally:
                        sampler.cancel()

                result = asyncio.run(measured())
                result.update(
                    rss_before_mib=round(rss_before / 2**20),
                    rss_peak_mib=round(peak[0] / 2**20),
                    rss_after_mib=round(memory.memory_info().rss / 2**20),
                )
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    import fastapi
    import uvicorn

    print(
        json.dumps(
            {
                "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
                "python": platform.python_version(),
                "torch": torch.__version__,
                "fastapi": fastapi.__version__,
                "uvicorn": uvicorn.__version__,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "model": "tiny" if not args.model else args.model,
                "max_batch": args.max_batch,
                "max_seconds_per_piece": args.max_seconds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
