"""Peak host memory and time of `python -m higgs_lora.merge` on a random model of the released width.

    python bench/merge_memory.py --layers 28 --no-verify        # released size (11.5 GB in bf16): the streaming merge
    python bench/merge_memory.py --layers 6                      # 6 layers of full width, with the logits check
    python bench/merge_memory.py --layers 6 --quantization nf4   # as a QLoRA adapter: the 4-bit comparison too

Writes, under --work (default: a temporary directory, removed afterwards unless --keep):
- a random base of the released architecture with `--layers` layers (shapes from HiggsAudioV2ForConditionalGeneration
  built on the meta device; text head included), bf16, written tensor by tensor so building it needs no model in
  memory; the tiny checkpoint's tokenizer, chat template and codec for the files merge copies (their ids are valid in
  the full vocabulary);
- a random LoRA adapter (r 16, alpha 32, all projections of attention and both MLPs, A and B non-zero) with the
  higgs_lora.yaml a training run writes;

then runs the merge CLI in a child process and reports its peak RSS and wall time, with the size of the base, as a
JSON line and a table row for docs/benchmarks.md. The peak is the child's own high-water mark (VmHWM, read by the
child as it exits): getrusage's figure for a child also counts the pages it shared with this process before exec,
i.e. the random base this script just built.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

FULL = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
}
CHILD = """
import sys
from higgs_lora.deploy.merge import main
code = main(sys.argv[1:])
print(open("/proc/self/status").read(), file=sys.stderr)
sys.exit(code)
"""
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_base(tiny_model: Path, out: Path, num_layers: int) -> int:
    """A random bf16 base of the released width with `num_layers` layers; returns its parameter count."""
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    from higgs_lora.deploy.shards import ShardWriter, TensorSpec

    config = json.loads((tiny_model / "config.json").read_text())
    config.update(FULL, num_hidden_layers=num_layers, dtype="bfloat16")
    with torch.device("meta"):
        meta = HiggsAudioV2ForConditionalGeneration(HiggsAudioV2Config(**config), use_text_head=True)
    generator = torch.Generator().manual_seed(0)
    state = meta.state_dict()
    writer = ShardWriter(out, [TensorSpec(name, "BF16", tuple(t.shape)) for name, t in state.items()])
    total = 0
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            value = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
        writer.add(name, value)
        total += tensor.numel()
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
    ):
        shutil.copy2(tiny_model / name, out / name)
    return total


def write_random_adapter(base: Path, codec: Path, out: Path, quantization: str, rank: int = 16) -> None:
    """A PEFT-format LoRA adapter with non-zero A and B for every projection of `base`, plus higgs_lora.yaml."""
    from safetensors.torch import save_file

    from higgs_lora.config import ModelConfig, RunConfig, save_config
    from higgs_lora.deploy.shards import tensor_shapes

    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in tensor_shapes(base).items():
        if name.startswith("model.layers.") and name.split(".")[-2] in TARGETS:
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = (
                torch.randn(rank, shape[1], generator=generator) / shape[1] ** 0.5
            )
            tensors[f"base_model.model.{module}.lora_B.weight"] = (
                torch.randn(shape[0], rank, generator=generator) * 0.01
            )
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": list(TARGETS),
                "bias": "none",
                "lora_dropout": 0.0,
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "base_model_name_or_path": str(base),
                "task_type": None,
                "inference_mode": True,
            }
        )
    )
    cfg = RunConfig(
        name="bench-merge",
        model=ModelConfig(path=str(base), codec_path=str(codec), dtype="bf16", quantization=quantization),
    )
    cfg.lora.r, cfg.lora.alpha = rank, 2 * rank
    save_config(cfg, out / "higgs_lora.yaml")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (28 = the released model)")
    parser.add_argument(
        "--quantization",
        choices=("none", "nf4"),
        default="none",
        help="record the adapter as trained on an NF4 base (the check then also runs the 4-bit model)",
    )
    parser.add_argument("--no-verify", action="store_true", help="merge only, no logits check")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()

    from higgs_lora.tiny import ensure_tiny

    tiny = ensure_tiny(REPO_ROOT / "build" / "tiny")
    work = Path(args.work or tempfile.mkdtemp(prefix="merge-bench-"))
    try:
        started = time.perf_counter()
        num_params = write_random_base(tiny.model_dir, work / "base", args.layers)
        write_random_adapter(work / "base", tiny.codec_dir, work / "adapter", args.quantization)
        built = time.perf_counter() - started
        command = [
            sys.executable,
            "-c",
            CHILD,
            "--adapter",
            str(work / "adapter"),
            "--out",
            str(work / "Higgs-Audio-2-bench"),
            "--device",
            "cpu",
        ]
        if args.no_verify:
            command.append("--no-verify")
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        print(result.stdout, end="")
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            return result.returncode
        peak_gib = int(re.search(r"VmHWM:\s+(\d+) kB", result.stderr).group(1)) / 2**20
        record = {
            "date": datetime.date.today().isoformat(),
            "layers": args.layers,
            "parameters": num_params,
            "base_gib": num_params * 2 / 2**30,
            "verify": not args.no_verify,
            "quantization": args.quantization,
            "merge_seconds": round(seconds, 1),
            "peak_rss_gib": round(peak_gib, 2),
            "build_seconds": round(built, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__,
        }
        print(json.dumps(record))
        print(
            f"| {record['date']} | merge, {args.layers} layers of full width ({num_params / 1e9:.2f}B parameters, "
            f"{record['base_gib']:.1f} GiB bf16), {'with' if record['verify'] else 'no'} logits check"
            f"{', NF4 comparison' if args.quantization == 'nf4' else ''} | `python bench/merge_memory.py --layers "
            f"{args.layers}{' --no-verify' if args.no_verify else ''}"
            f"{' --quantization nf4' if args.quantization == 'nf4' else ''}` | | | "
            f"{seconds:.0f} s, peak RSS {peak_gib:.2f} GiB |"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
