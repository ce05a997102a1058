"""One prepared GPU check: every GPU figure of docs/benchmarks.md in one run of at most `--budget-s` seconds.

    bash bench/gpu_check.sh                                   # on the GPU machine (installs .whl/ first)
    python bench/gpu_check.py --device cpu --size tiny        # the CI run on a CPU: the plumbing, in seconds

Sections, each a bench/ script run as a subprocess under what is left of the time budget (a section that would not
fit is skipped, saying so):
- gpu_tests: `pytest -m gpu tests/gpu`;
- train: bench/train_throughput.py, ours vs the HF Trainer baseline (target-audio s/s, MFU, peak memory), LoRA
  bf16, the plain loop (DeepSpeed's launcher path is not run here: say so in the JSON);
- planner_and_qlora: bench/plan_calibration.py --method gpu: measured vs predicted peak at 16/24/40/80 GiB caps for
  LoRA bf16 and QLoRA (the 16 GiB row is the QLoRA-on-a-16-GiB-card question), CUDA and bitsandbytes only;
- decode_eager / decode_compiled: bench/infer_speed.py, batch-1 real-time factor, time to first streamed audio,
  batched frames/s at 8/32/64 (compiled: CUDA only);
- codec: bench/codec_throughput.py, hours of audio encoded per hour.
Writes `<out>/gpu_check.json` (every section's figures, status, reason, log file) and `<out>/gpu_check.md` (the
table), and prints the table and what it skipped for want of a package or a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench"
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "soundfile")


def available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


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
    """Runs sections within one deadline; collects their results."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline, self.results = out, time.monotonic() + budget_s, {}

    def skip(self, name: str, reason: str) -> None:
        self.results[name] = {"status": "skipped", "reason": reason}

    def run(self, name: str, command: list[str], timeout_s: float, parse) -> None:
        left = self.deadline - time.monotonic()
        if left < min(timeout_s, 20):
            self.skip(name, f"out of time ({left:.0f} s left of the budget)")
            return
        log = self.out / f"{name}.log"
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=min(timeout_s, left))
        except subprocess.TimeoutExpired as expired:
            log.write_text(str(expired.stdout or "") + str(expired.stderr or ""), encoding="utf-8")
            self.results[name] = {"status": "timeout", "seconds": time.monotonic() - started, "log": log.name}
            return
        log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr, encoding="utf-8")
        result = {"status": "ok" if done.returncode == 0 else "failed", "returncode": done.returncode}
        result |= {"seconds": round(time.monotonic() - started, 1), "log": log.name, "command": " ".join(command)}
        if done.returncode == 0:
            try:
                result["figures"] = parse(done.stdout)
            except Exception as error:  # a figure we could not read is reported, the others still run
                result["status"], result["reason"] = "failed", f"could not read its output: {error!r}"
        self.results[name] = result


def parse_pytest(stdout: str) -> dict:
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", stdout)}
    return counts


def parse_codec(stdout: str) -> dict:
    match = re.search(r"throughput: ([\d.]+) s of audio per second = ([\d.]+) h of audio per hour", stdout)
    return {"encode_audio_s_per_s": float(match.group(1)), "encode_audio_h_per_h": float(match.group(2))}


def json_file_parser(path: Path):
    return lambda _stdout: json.loads(path.read_text(encoding="utf-8"))


def check(args) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    full = args.size == "full"
    python = sys.executable
    runner = Runner(out, args.budget_s)
    missing = [name for name in PACKAGES if not available(name)]

    runner.run(
        "gpu_tests",
        [python, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
        120,
        parse_pytest,
    )

    train_json = out / "train.json"
    train = [python, str(BENCH / "train_throughput.py"), "--size", args.size, "--json", str(train_json)]
    train += ["--steps", "6", "--warmup", "2"] if full else ["--steps", "1", "--warmup", "1", "--num-samples", "4"]
    runner.run("train", train, 200, json_file_parser(train_json))
    if "train" in runner.results:
        runner.results["train"]["loop"] = "plain PyTorch loop (DeepSpeed's launcher is not run by this check)"

    if not cuda:
        runner.skip("planner_and_qlora", "needs CUDA (allocator peaks under set_per_process_memory_fraction)")
    else:
        plan_json = out / "planner.json"
        quantizations = ["none", "nf4"] if available("bitsandbytes") else ["none"]
        if "bitsandbytes" in missing:
            runner.results["qlora"] = {"status": "skipped", "reason": "bitsandbytes is not installed"}
        command = [python, str(BENCH / "plan_calibration.py"), "--method", "gpu", "--caps", "16", "24", "40", "80"]
        command += ["--quantizations", *quantizations, "--steps", "3", "--sweep", "2048", "4096", "--json"]
        runner.run("planner_and_qlora", command + [str(plan_json)], 240, json_file_parser(plan_json))

    decode = [python, str(BENCH / "infer_speed.py"), "--size", args.size, "--device", args.device]
    decode += (
        ["--seconds", "4", "--batch", "8", "32", "64", "--repeats", "2"]
        if full
        else ["--seconds", "0.4", "--batch", "2", "--repeats", "1"]
    )
    runner.run("decode_eager", decode + ["--compile", "off"], 120, last_json)
    if cuda:
        runner.run("decode_compiled", decode + ["--compile", "on"], 150, last_json)
    else:
        runner.skip("decode_compiled", "needs CUDA (inductor on a CPU compiles for minutes; CUDA graphs need a GPU)")

    codec = [python, str(BENCH / "codec_throughput.py"), "--size", args.size]
    codec += ["--seconds", "10", "--repeats", "3"] if full else ["--seconds", "1", "--repeats", "1"]
    runner.run("codec", codec, 90, parse_codec)

    return {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device,
            "size": args.size,
            "budget_s": args.budget_s,
            "python": platform.python_version(),
            "packages_missing": missing,
        },
        "sections": runner.results,
    }


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
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    text = table(report)
    (args.out / "gpu_check.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    for name in report["meta"]["packages_missing"]:
        print(f"skipped for want of a package: {name} is not installed")
    for name, result in report["sections"].items():
        if result["status"] == "skipped":
            print(f"skipped {name}: {result['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
