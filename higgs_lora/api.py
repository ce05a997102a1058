"""The Python API for the three jobs, the functions the command lines run (docs/python_api.md):

    cfg = higgs_lora.load_config("configs/arabic_lora.yaml", ["model.path=/models/higgs", "data.corpus=..."])
    report = higgs_lora.prepare_corpus(cfg)       # what `higgs-lora prepare --config ...` runs
    metrics = higgs_lora.train_adapter(cfg)      # what `python launch/train.py --ds auto --config ...` runs
    cloner = higgs_lora.VoiceCloner.load(model_dir, adapters={"ar": adapter_dir})   # what infer and serve load
    result = cloner.clone("ref.wav", "reference transcript", "target text")

A face, like `cli.py`: it may import every stage, lazily (`import higgs_lora` stays cheap). A user error raises
`errors.UserError` (the CLIs print it and exit 2); the API lets it propagate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from higgs_lora import startup
from higgs_lora.logs import current_level, setup_logging

if TYPE_CHECKING:
    from higgs_lora.config import RunConfig


def _start() -> None:
    """What an entry point does first: offline switches, and the package's log lines unless the caller set them."""
    startup.go_offline()
    if current_level() is None:
        setup_logging()


def prepare_corpus(cfg: RunConfig, quiet: bool = False) -> dict:
    """Corpus -> checked, normalised codec-token cache in `data.cache_dir`, in this process; returns the report
    (`report.json`: kept/rejected counts, hours, speakers, durations). Shards already written are kept, so an
    interrupted call resumes. Array jobs over many machines use the CLI's `--num-shards/--shard-index`."""
    from higgs_lora.config import ConfigError
    from higgs_lora.data.prepare import join, run_prepare

    _start()
    if not cfg.data.corpus:
        raise ConfigError(["data.corpus is not set: point it at your corpus (see docs/data.md)"])
    run_prepare(cfg, quiet=quiet)
    return join(cfg)


def train_adapter(cfg: RunConfig, ds_config: str = "auto") -> dict:
    """Plan, build, train and save a LoRA/QLoRA adapter for `cfg`; returns the last logged training metrics.

    `ds_config` is a DeepSpeed JSON path (`ds_configs/zero2.json`, ...) or "auto" (everything planned), as `--ds`.
    One process (one GPU, or the CPU) unless a launcher started this one: several GPUs or nodes go through
    `deepspeed`/`torchrun` running `launch/train.py` (or your own script calling this) on every rank. Call it from
    the main thread (it installs the SIGTERM/SIGUSR1 checkpoint-and-exit handlers) and once per process (the process
    group stays up). A run that stopped on a signal saved a checkpoint and resumes when called again."""
    from higgs_lora.train.run import run

    _start()
    return run(cfg, str(ds_config))
