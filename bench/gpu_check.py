"""One prepared GPU check: every GPU figure of docs/benchmarks.md in one run of at most `--budget-s` seconds.

    bash bench/gpu_check.sh                                   # on the GPU machine (installs .whl/ first)
    python bench/gpu_check.py --device cpu --size tiny        # the CI run on a CPU: the plumbing, in seconds

Sections, most wanted first, each a bench/ script run as a subprocess under its own limit and what is left of the
budget (a section that would not fit is skipped, saying so; one that runs over is killed with its process group and
keeps the figures it printed):
- gpu_tests: `pytest -m gpu tests/gpu`;
- train: bench/train_throughput.py, ours vs the HF Trainer baseline (target-audio s/s, MFU, peak memory), LoRA
  bf16, the plain loop (DeepSpeed's launcher path is not run here: say so in the JSON);
- planner_and_qlora: bench/plan_calibration.py --method gpu: QLoRA under a 16 GiB cap first (the 16 GB-card
  question), then LoRA bf16 measured vs predicted peak at 16/24/40/80 GiB caps; CUDA (and bitsandbytes) only;
- codec: bench/codec_throughput.py, hours of audio encoded per hour;
- decode_eager / decode_compiled: bench/infer_speed.py, batch-1 real-time factor, time to first streamed audio,
  batched frames/s at 8/32/64 (compiled: CUDA only, ours only), one random full-size checkpoint for both.
Writes `<out>/gpu_check.json` (every section's figures, status, reason, log file) and `<out>/gpu_check.md` (the
table) after every section, and prints the table and what it skipped for want of a package or a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from higgs_lora.files import atomic_write_text  # noqa: E402  (light: os, pathlib, tempfile)

BENCH = REPO_ROOT / "bench"
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "soundfile")


def available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-installed package counts as missing
        return False


def last_json(text: str) -> dict | None:
    """The last JSON object printed from column 0 to the end of `text`."""
    starts = [m.start() for m in re.finditer(r"^\{", text, flags=re.M)]
    for start in reversed(starts):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    return None


class Runner:
    """Runs sections within one deadline; collects their results, and rewrites the report after every section (a
    run killed from outside still leaves the sections it finished)."""

    def __init__(self, out: Path, budget_s: float, meta: dict):
        self.out, self.deadline, self.results, self.meta = out, time.monotonic() + budget_s, {}, meta

    def skip(self, name: str, reason: str) -> None:
        self.results[name] = {"status": "skipped", "reason": reason}
        self.save()

    def report(self) -> dict:
        return {"meta": self.meta, "sections": self.results}

    def save(self) -> None:
        report = self.report()
        atomic_write_text(self.out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
        atomic_write_text(self.out / "gpu_check.md", table(report) + "\n")

    def run(self, name: str, command: list[str], timeout_s: float, parse) -> None:
        """Run one section under min(`timeout_s`, what is left); a section cut by its limit is killed with its
        whole process group (compile workers included) and keeps the figures it printed so far (bench scripts
        print their JSON as they go), marked "timeout"."""
        left = self.deadline - time.monotonic()
        if left < min(timeout_s, 20):
            self.skip(name, f"out of time ({left:.0f} s left of the budget)")
            return
        log = self.out / f"{name}.log"
        started = time.monotonic()
        limit = min(timeout_s, left)
        result = {"command": " ".join(command), "limit_s": round(limit)}
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            stdout, stderr = process.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            timed_out = True
        log.write_text(stdout + "\n--- stderr ---\n" + stderr, encoding="utf-8")
        result |= {"seconds": round(time.monotonic() - started, 1), "log": log.name}
        if not timed_out:
            result["returncode"] = process.returncode
        if not timed_out and process.returncode != 0:
            result["status"] = "failed"
            result["reason"] = (stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
        else:
            result["status"] = "timeout" if timed_out else "ok"
            try:
                result["figures"] = parse(stdout)
            except Exception as error:  # reported; the other sections still run
                what = "printed no complete figure before its limit" if timed_out else "could not read its output"
                result["reason"] = f"{what}: {error!r}"
                if not timed_out:
                    result["status"] = "failed"
        self.results[name] = result
        self.save()


def parse_pytest(stdout: str) -> dict:
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", stdout)}
    return counts


def parse_codec(stdout: str) -> dict:
    match = re.search(r"throughput: ([\d.]+) s of audio per second = ([\d.]+) h of audio per hour", stdout)
    return {"encode_audio_s_per_s": float(match.group(1)), "encode_audio_h_per_h": float(match.group(2))}


def json_file_parser(path: Path):
    return lambda _stdout: json.loads(path.read_text(encoding="utf-8"))


def partial_json_lines(path: Path):
    """The JSON file when the script finished; else (cut by its limit) the one-line JSON rows it printed so far."""

    def parse(stdout: str):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        return {"partial_rows": [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]}

    return parse


def check(args) -> dict:
    """The sections, most wanted first (a section that would not fit in what is left is skipped, saying so):
    GPU tests, training throughput, planner + QLoRA, codec, eager decode, compiled decode (compiles per bucket)."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    full = args.size == "full"
    python = sys.executable
    missing = [name for name in PACKAGES if not available(name)]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "size": args.size,
        "budget_s": args.budget_s,
        "python": platform.python_version(),
        "packages_missing": missing,
    }
    runner = Runner(out, args.budget_s, meta)

    runner.run(
        "gpu_tests",
        [python, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
        60,
        parse_pytest,
    )

    train_json = out / "train.json"
    train = [python, str(BENCH / "train_throughput.py"), "--size", args.size, "--json", str(train_json)]
    train += ["--steps", "6", "--warmup", "2"] if full else ["--steps", "1", "--warmup", "1", "--num-samples", "4"]
    runner.run("train", train, 120, json_file_parser(train_json))
    if "train" in runner.results:
        runner.results["train"]["loop"] = "plain PyTorch loop (DeepSpeed's launcher is not run by this check)"

    if not cuda:
        runner.skip("planner_and_qlora", "needs CUDA (allocator peaks under set_per_process_memory_fraction)")
    else:
        plan_json = out / "planner.json"
        quantizations = ["nf4", "none"] if available("bitsandbytes") else ["none"]  # QLoRA first: the 16 GB question
        if "bitsandbytes" in missing:
            runner.skip("qlora", "bitsandbytes is not installed")
        # LoRA bf16 at every cap; QLoRA at the 16 GiB cap (the planner's budget) and at 2k positions (the
        # 16 GB-card question). No slope sweep: it would build the 5.8B model 4 more times per quantization.
        command = [python, str(BENCH / "plan_calibration.py"), "--method", "gpu", "--caps", "16", "24", "40", "80"]
        command += ["--quantizations", *quantizations, "--nf4-caps", "16", "--nf4-budget", "2048", "--steps", "3"]
        command += ["--sweep", "--json", str(plan_json)]
        runner.run("planner_and_qlora", command, 170, partial_json_lines(plan_json))

    codec = [python, str(BENCH / "codec_throughput.py"), "--size", args.size]
    codec += ["--seconds", "10", "--batch", "8", "--repeats", "3"] if full else ["--seconds", "1", "--repeats", "1"]
    runner.run("codec", codec, 45, parse_codec)

    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-decode-"))  # the random full-size checkpoint, built once
    try:
        decode = [python, str(BENCH / "infer_speed.py"), "--size", args.size, "--device", args.device]
        decode += ["--workdir", str(workdir)]
        decode += (
            ["--seconds", "3", "--batch", "8", "32", "64", "--repeats", "2"]
            if full
            else ["--seconds", "0.4", "--batch", "2", "--repeats", "1"]
        )
        runner.run("decode_eager", decode + ["--compile", "off"], 140, last_json)
        if cuda:  # ours only: the transformers baseline is the eager section's
            runner.run("decode_compiled", decode + ["--compile", "on", "--no-baseline"], 260, last_json)
        else:
            runner.skip("decode_compiled", "needs CUDA (inductor on a CPU compiles for minutes; no CUDA graphs)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # full size: ~12 GB

    runner.meta["seconds"] = round(args.budget_s - (runner.deadline - time.monotonic()), 1)
    runner.save()
    return runner.report()


def table(report: dict) -> str:
    lines = ["| section | status | seconds | figures / reason |", "|---|---|---|---|"]
    for name, result in report["sections"].items():
        figures = result.get("figures")
        if isinstance(figures, dict) and "results" in figures:
            figures = figures["results"]
        detail = result.get("reason") or (json.dumps(figures, default=str)[:300] if figures else "")
        lines.append(f"| {name} | {result['status']} | {result.get('seconds', '')} | {detail or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole check's time (9 minutes)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "gpu_check")
    args = parser.parse_args(argv)
    report = check(args)
    print(table(report))
    for name in report["meta"]["packages_missing"]:
        print(f"skipped for want of a package: {name} is not installed")
    for name, result in report["sections"].items():
        if result["status"] == "skipped":
            print(f"skipped {name}: {result['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
