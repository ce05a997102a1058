"""`python -m higgs_lora.evaluate`: score an inference output folder (`--pred out/`, higgs_lora.eval.cli), or
evaluate a checkpoint without training (`--checkpoint runs/x` / `--model merged/ --config X.yaml`,
higgs_lora.train.evaluate_checkpoint). See docs/evaluation.md.
"""

from __future__ import annotations

import sys

CHECKPOINT_FLAGS = ("--checkpoint", "--model")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg.split("=", 1)[0] in CHECKPOINT_FLAGS for arg in argv):
        from higgs_lora.train.evaluate_checkpoint import main as evaluate_checkpoint

        return evaluate_checkpoint(argv)
    from higgs_lora.eval.cli import main as evaluate_folder

    return evaluate_folder(argv)


if __name__ == "__main__":
    raise SystemExit(main())
