"""Train a LoRA/QLoRA adapter on Higgs Audio v2 with DeepSpeed.

    deepspeed launch/train.py --ds ds_configs/zero2.json --config configs/arabic_lora.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/train.py --ds ds_configs/zero3.json --config configs/X.yaml
    python launch/train.py --ds ds_configs/zero2.json --config configs/demo.yaml        # one process

parse -> plan -> build -> train -> save: this script parses, higgs_lora.train.run does the rest. Exit codes: 0 done
(or stopped by SIGTERM/SIGUSR1 after a checkpoint), 2 a problem the message says how to fix (configuration, plan,
cache, checkpoint), 1 training failed.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from higgs_lora import startup, stop  # noqa: E402
from higgs_lora.config import ConfigError, add_config_arguments, config_from_args  # noqa: E402
from higgs_lora.files import writable_dir_problem  # noqa: E402


def main(argv=None) -> int:
    stop.catch()  # first: SLURM's time-limit warning may come while torch is still importing
    parser = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ds", required=True, help="DeepSpeed JSON (ds_configs/zero2.json, zero3.json, ...)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: train(args))


def train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    problem = writable_dir_problem(cfg.output_dir)
    if problem is not None:  # before torch and the model load, not as a PermissionError traceback at the end
        raise ConfigError([f"output_dir={cfg.output_dir}: {problem}; set output_dir to a directory you can write"])

    from higgs_lora.train.loop import NonFiniteLossError
    from higgs_lora.train.run import run

    try:
        run(cfg, args.ds)
    except NonFiniteLossError as err:  # the run failed (exit 1); the message says what to try
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
