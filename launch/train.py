"""Train a LoRA/QLoRA adapter on Higgs Audio v2 with DeepSpeed.

    deepspeed launch/train.py --ds ds_configs/zero2.json --config configs/arabic_lora.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/train.py --ds ds_configs/zero3.json --config configs/X.yaml
    python launch/train.py --ds ds_configs/zero2.json --config configs/demo.yaml        # one process

parse -> plan -> build -> train -> save; the work lives in higgs_lora.train.loop. Exit codes: 0 done (or stopped by
SIGTERM/SIGUSR1 after a checkpoint), 2 bad configuration, 1 training failed.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from higgs_lora import stop  # noqa: E402
from higgs_lora.config import ConfigError, add_config_arguments, config_from_args  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ds", required=True, help="DeepSpeed JSON (ds_configs/zero2.json, zero3.json, ...)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    stop.catch()  # SLURM's time-limit warning may come while torch is still importing
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local; never reach a hub
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from higgs_lora.train.checkpoint import ResumeError
    from higgs_lora.data.prepare import CacheError
    from higgs_lora.data.sampler import DataError
    from higgs_lora.errors import CheckpointError
    from higgs_lora.plan import PlanError
    from higgs_lora.train.loop import NonFiniteLossError, run

    try:
        run(cfg, args.ds)
    except (PlanError, CacheError, CheckpointError, ResumeError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
