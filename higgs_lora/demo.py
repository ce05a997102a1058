"""The bundled demo: the whole pipeline on a tiny model and the demo corpus, on CPU.

`make demo` runs `python -m higgs_lora.demo --config configs/demo.yaml`:

1. builds the tiny random model if it is missing (`python -m higgs_lora.tiny`);
2. `prepare`: demo corpus -> checked, normalised codec-token cache, with its report;
3. trains through the real launcher, exactly as a user would on GPUs:
   `deepspeed --num_gpus N launch/train.py --ds ds_configs/zero2.json --config <resolved config>`
   (2 data-parallel ranks over gloo on CPU, ZeRO-2), with checkpoints, held-out-speaker evaluation and an adapter;
4. summarises what the run logged and where the adapter is;
5. clones the held-out speakers' voices with the trained adapter through the batch CLI (`higgs_lora.infer.batch`):
   `runs/demo/clone/NNN.wav` + `manifest.jsonl`. The tiny random model babbles; the point is the whole path;
6. evaluates the clones (`python -m higgs_lora.evaluate --pred runs/demo/clone`): speaker similarity, DNSMOS,
   duration and speed, in `runs/demo/clone/report.html` (no ASR model is bundled, so CER/WER are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from higgs_lora import startup
from higgs_lora.config import RunConfig, add_config_arguments, config_from_args, save_config
from higgs_lora.errors import PARTLY_FAILED
from higgs_lora.logs import get_logger

log = get_logger("demo")

DEFAULT_TINY_DIR = "build/tiny"
REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_cache(cfg: RunConfig, quiet: bool = True) -> dict:
    """Build (or finish) the codec-token cache for `cfg` and return its report."""
    from higgs_lora.data.prepare import join, run_prepare

    run_prepare(cfg, quiet=quiet)
    return join(cfg)


def launcher_command(config_path: Path, ds_config: str, num_ranks: int) -> list[str]:
    """The `deepspeed` launcher command line that trains the demo (the launcher from this Python's environment)."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [
        str(deepspeed),
        "--num_gpus",
        str(num_ranks),
        str(REPO_ROOT / "launch" / "train.py"),
        "--ds",
        ds_config,
        "--config",
        str(config_path),
    ]


def summarise(out: Path) -> dict:
    """First and last logged training loss, the last evaluation loss, and the adapter's files."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    adapter = out / "adapter"
    return {
        "steps": train[-1]["step"],
        "first_loss": train[0]["loss"],
        "last_loss": train[-1]["loss"],
        "first_eval_loss": evals[0]["loss"] if evals else None,
        "last_eval_loss": evals[-1]["loss"] if evals else None,
        "adapter": str(adapter),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
    }


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """`cfg` with its paths made absolute (from the current directory), so the launcher can run from anywhere."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path else path

    cfg.output_dir = absolute(cfg.output_dir)
    cfg.model.path, cfg.model.codec_path = absolute(cfg.model.path), absolute(cfg.model.codec_path)
    cfg.data.corpus, cfg.data.cache_dir = absolute(cfg.data.corpus), absolute(cfg.data.cache_dir)
    return cfg


def run(cfg: RunConfig, tiny_dir: str | None, ds_config: str, num_ranks: int) -> int:
    import torch

    cfg = with_absolute_paths(cfg)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = Path(cfg.output_dir)
    if tiny_dir:
        from higgs_lora.tiny import ensure_tiny

        paths = ensure_tiny(tiny_dir)
        log.info(f"tiny model ready: {paths.model_dir}")
    config_path = save_config(cfg, out / "demo_config.yaml")
    log.info(f"resolved config written to {config_path}")

    from higgs_lora.data.prepare import format_report

    log.info("prepare: demo corpus -> checked, normalised codec-token cache")
    for line in format_report(ensure_cache(cfg, quiet=False)).splitlines():
        log.info(f"  {line}")

    command = launcher_command(config_path, ds_config, num_ranks)
    log.info(f"train: {' '.join(command)}")
    # One thread per rank: ranks share the CPU's cores, and oversubscribed threads slow every rank down.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if result.returncode != 0:
        log.error(f"FAILED: training exited with {result.returncode}")
        return 1
    summary = summarise(out)
    from higgs_lora.files import atomic_write_json

    report = atomic_write_json(out / "demo_report.json", summary)
    evaluation = ""
    if summary["last_eval_loss"] is not None:
        evaluation = f"; held-out speaker loss {summary['first_eval_loss']:.3f} -> {summary['last_eval_loss']:.3f}"
    log.info(
        f"training loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over "
        f"{summary['steps']} steps{evaluation}"
    )
    log.info(f"adapter: {summary['adapter']} ({summary['adapter_bytes'] / 1024:.0f} KiB; plain PEFT format)")
    if not summary["last_loss"] < summary["first_loss"]:
        log.error("FAILED: the training loss did not fall")
        return 1
    clone_dir = clone_demo_voices(cfg, out)
    if clone_dir is None:
        return 1
    report_html = evaluate_clones(clone_dir)
    if report_html is None:
        return 1
    log.info(
        f"done. Outputs in {out.resolve()}: checkpoints/, adapter/, metrics.jsonl, tensorboard/, "
        f"eval_samples/, {report.name}, {clone_dir.name}/ (report: {report_html})"
    )
    return 0


def demo_samples(cfg: RunConfig, out: Path, per_speaker: int = 2) -> Path:
    """A seed-format ChatML file cloning the held-out speakers: each speaker's first utterance is the reference,
    the next ones are targets (their text to speak, their recording as ground truth for evaluation)."""
    from higgs_lora.data.sampler import split_speakers
    from higgs_lora.data.sources import read_corpus

    corpus = read_corpus(cfg.data.corpus, cfg.data.format, cfg.data.language)
    # The speakers training held out (same rule, same seed), so the demo clones voices the adapter never heard.
    speakers = sorted(
        split_speakers(
            [u.speaker for u in corpus.utterances], cfg.data.eval_speakers, cfg.data.num_eval_speakers, cfg.seed
        )
    )
    speakers = speakers or sorted({u.speaker for u in corpus.utterances})[:1]
    samples = []
    for speaker in speakers:
        utterances = [u for u in corpus.utterances if u.speaker == speaker]
        reference = utterances[0]
        for target in utterances[1 : 1 + per_speaker]:
            user = [
                {"type": "text", "text": reference.text},
                {"type": "audio", "audio_url": reference.audio},
                {"type": "text", "text": target.text},
            ]
            samples.append(
                {
                    "speaker": speaker,
                    "messages": [
                        {"role": "system", "content": "Generate audio following instruction."},
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": [{"type": "audio", "audio_url": target.audio}]},
                    ],
                }
            )
    from higgs_lora.files import atomic_write_text

    return atomic_write_text(out / "clone_samples.json", json.dumps(samples, ensure_ascii=False, indent=1))


def clone_demo_voices(cfg: RunConfig, out: Path) -> Path | None:
    """Run the batch CLI with the trained adapter on the demo's cloning samples; the output directory."""
    from higgs_lora.infer import batch as infer

    samples = demo_samples(cfg, out)
    clone_dir = out / "clone"
    command = [
        "--chatml",
        str(samples),
        "--out",
        str(clone_dir),
        "--model",
        cfg.model.path,
        "--adapter",
        f"demo={out / 'adapter'}",
        "--max-seconds",
        "4",
        "--quiet",
    ]
    log.info(f"clone: python -m higgs_lora.infer {' '.join(command)}")
    if infer.main(command) not in (0, PARTLY_FAILED):  # 3: some samples failed (errors.jsonl), the rest written
        log.error("FAILED: cloning wrote no audio")
        return None
    first = json.loads((clone_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    log.info(
        f"cloned voice: {clone_dir / first['wav']} ({first['duration_s']:.2f} s, speaker "
        f"{first['speaker']}, real-time factor {first['rtf']:.2f})"
    )
    return clone_dir


def evaluate_clones(clone_dir: Path) -> Path | None:
    """`python -m higgs_lora.evaluate` on the cloned voices; the report's path (None when nothing was scored)."""
    from higgs_lora.eval import cli as evaluate

    command = ["--pred", str(clone_dir), "--quiet"]
    log.info(f"evaluate: python -m higgs_lora.evaluate {' '.join(command)}")
    if evaluate.main(command) != 0:
        log.error("FAILED: the evaluation scored no sample")
        return None
    return clone_dir / "report.html"


def _run(args: argparse.Namespace) -> int:
    return run(config_from_args(args), args.tiny_dir or None, args.ds, args.ranks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="higgs-lora demo", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument(
        "--tiny-dir",
        default=DEFAULT_TINY_DIR,
        help="build the tiny model here if missing (set model.path to its model/ directory); '' to skip",
    )
    parser.add_argument("--ds", default=str(REPO_ROOT / "ds_configs" / "zero2.json"), help="DeepSpeed JSON")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (processes) to train with")
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
