"""`higgs-lora <verb> ...`: one command line for every stage (also `python -m higgs_lora <verb>`).

Each verb runs the `main(argv)` of the module that does the work, the same function `python -m higgs_lora.<verb>`
runs, so both forms take the same arguments. Training is not a verb: it runs under a launcher
(`deepspeed launch/train.py ...`, see docs/training.md). Imports only the module of the verb that runs.
"""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "prepare": ("higgs_lora.data.prepare", "corpus -> checked, normalised codec-token cache, with a report"),
    "plan": ("higgs_lora.plan.cli", "what will fit on this hardware, and why (dry run of the planner)"),
    "merge": ("higgs_lora.deploy.merge", "fold a trained LoRA adapter into its base: a plain checkpoint"),
    "convert": ("higgs_lora.deploy.convert", "Boson's original model or codec download -> transformers layout"),
    "infer": ("higgs_lora.infer.batch", "batch voice cloning from a ChatML/JSONL file of samples"),
    "serve": ("higgs_lora.serve.app", "REST + WebSocket cloning server"),
    "evaluate": (
        "higgs_lora.evaluate",
        "score an inference output folder (--pred), or a checkpoint without training (--checkpoint)",
    ),
    "report": ("higgs_lora.eval.run_report", "a training run's curves as report.html, from its metrics.jsonl"),
    "tiny": ("higgs_lora.tiny", "write the tiny random model + codec used by the demo and the tests"),
    "demo": ("higgs_lora.demo", "the whole pipeline on the bundled demo corpus and tiny model (CPU)"),
    "config": ("higgs_lora.config.help", "print a resolved run config, or every key with its help"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: higgs-lora <verb> [arguments]   (higgs-lora <verb> --help for a verb's arguments)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {about}" for verb, (_, about) in VERBS.items()]
    lines += [
        "",
        "training: deepspeed launch/train.py --ds ds_configs/zero2.json --config configs/X.yaml [key=value ...]",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
