"""The optimizer and the engine: torch AdamW (fused on GPU) with a skip switch, warm-up then cosine, all inside
`deepspeed.initialize`.

Imports torch (DeepSpeed when the engine is built). See docs/training.md (What one step does, 4. Engine).
"""

from __future__ import annotations

import math

import torch

from higgs_lora.config import RunConfig


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next `step` can be turned into a no-op (a step with a non-finite loss must not move weights).

    DeepSpeed's ZeRO optimizers call `step` on this inner optimizer; skipping it leaves the fp32 master weights and
    the Adam moments untouched, and ZeRO clears the gradients as after any step.
    """

    skip_next: bool = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up from 1/warmup to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_engine(model, cfg: RunConfig, ds_config: dict, total_steps: int):
    """(engine, inner optimizer) from the PEFT model and the resolved DeepSpeed config."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    fused = (
        torch.cuda.is_available()
        and ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "none"
    )
    optimizer = SkippableAdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train.warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer
