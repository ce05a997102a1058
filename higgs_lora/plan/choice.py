"""The choice: ZeRO stage, offload, gradient checkpointing, micro-batch token budget and gradient accumulation.

`make_plan` tries the ways of running in order of speed (ZeRO-2; + checkpointing; ZeRO-3 + checkpointing; + parameter
offload), less those the user pinned out, and takes the first whose largest fitting budget reaches the useful budget;
else the one with the largest budget that holds the longest sample; else a `PlanError` saying what would fit. The
rules are in docs/planning.md ("How it decides").

Pure: reads the run config, the DeepSpeed JSON, the model's config.json numbers, a `Hardware` and `SequenceStats`,
never torch or a process group, so every rank computes the same plan. Imports config and the other plan modules.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from higgs_lora.config import RunConfig, max_sample_audio_positions
from higgs_lora.plan.ds_config import ds_stage_and_offload
from higgs_lora.plan.errors import PlanError
from higgs_lora.plan.hardware import Hardware, describe_hardware
from higgs_lora.plan.inputs import (
    SequenceStats,
    lora_parameter_count,
    model_sizes,
    sequence_stats,
)
from higgs_lora.plan.memory import (
    ALL_CANDIDATES,
    BUDGET_STEP,
    CANDIDATES,
    COEFFICIENTS,
    GIB,
    Candidate,
    Coefficients,
    MemoryModel,
)


@dataclass(frozen=True)
class Plan:
    """What the run will do on this hardware."""

    world_size: int
    zero_stage: int
    offload: str
    """'none', 'optimizer' or 'optimizer+params'."""
    micro_batch_tokens: int
    accumulation: int
    """Micro-batches per rank per optimizer step."""
    gradient_checkpointing: bool
    dtype: str
    quantization: str
    trainable_parameters: int
    nodes: int = 1
    global_batch_target: int = 0
    """What the user asked for (train.global_batch_tokens); 0: one micro-batch per rank."""
    memory: tuple[tuple[str, float], ...] = ()
    """(term, bytes) of the predicted peak at the chosen budget; empty when memory was not planned (CPU)."""
    capacity_bytes: float = 0.0
    margin: float = 0.0
    reasons: tuple[str, ...] = ()
    """Why this choice: pinned values and rejected faster candidates."""
    hardware: str = ""
    sequences: str = ""

    @property
    def global_batch_tokens(self) -> int:
        """Upper bound of model positions (padding included) per optimizer step: what the run actually uses."""
        return self.micro_batch_tokens * self.accumulation * self.world_size

    @property
    def predicted_peak(self) -> float:
        return sum(value for _, value in self.memory)

    def describe(self) -> str:
        rows = [
            ("hardware", self.hardware or f"{self.world_size} ranks"),
            ("ranks", f"{self.world_size} ({self.nodes} node{'s' if self.nodes > 1 else ''})"),
            ("ZeRO stage", f"{self.zero_stage} (offload: {self.offload})"),
            ("base weights", f"{self.dtype}" + (" + NF4 4-bit (QLoRA)" if self.quantization == "nf4" else "")),
            ("gradient checkpointing", "on" if self.gradient_checkpointing else "off"),
            ("trainable (LoRA) parameters", f"{self.trainable_parameters:,}"),
            ("micro-batch token budget", f"{self.micro_batch_tokens:,} positions per rank"),
            ("gradient accumulation", f"{self.accumulation} micro-batches per rank per step"),
            (
                "global batch",
                f"<= {self.global_batch_tokens:,} positions per optimizer step"
                + (f" (asked: {self.global_batch_target:,})" if self.global_batch_target else ""),
            ),
        ]
        if self.sequences:
            rows.append(("sample lengths", self.sequences))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"  - {reason}" for reason in self.reasons]
        if self.memory:
            lines.append("")
            lines.append(memory_table(self.memory, self.capacity_bytes, self.margin))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory"] = {name: value for name, value in self.memory}
        data["global_batch_tokens"] = self.global_batch_tokens
        data["predicted_peak_bytes"] = self.predicted_peak
        return data


def memory_table(memory, capacity: float, margin: float) -> str:
    """The predicted peak per GPU, term by term, against the GPU's memory and the margin."""
    width = max(len(name) for name, _ in memory)
    lines = [f"{'predicted peak per GPU':<{width}}  {'GB':>7}"]
    lines += [f"{name:<{width}}  {value / 1e9:7.2f}" for name, value in memory]
    total = sum(value for _, value in memory)
    usable = capacity * (1 - margin)
    lines.append(f"{'sum':<{width}}  {total / 1e9:7.2f}")
    lines.append(f"{'GPU memory':<{width}}  {capacity / 1e9:7.2f}")
    lines.append(f"{f'margin ({margin:.0%})':<{width}}  {capacity * margin / 1e9:7.2f}")
    lines.append(f"{'headroom':<{width}}  {(usable - total) / 1e9:7.2f}")
    return "\n".join(lines)


def _pins(cfg: RunConfig, ds_config: dict) -> tuple[dict, list[str]]:
    """What the user fixed (stage, offload, checkpointing), and contradictions between the places it can be set."""
    problems = []
    stage, offload = ds_stage_and_offload(ds_config)
    if cfg.model.quantization == "nf4" and "optimizer+params" in (offload, cfg.plan.offload):
        problems.append("QLoRA (model.quantization=nf4) cannot offload parameters: use ds_configs/zero3.json")
    if stage is not None and stage not in (2, 3):
        problems.append(f"the DeepSpeed config has ZeRO stage {stage}; use ds_configs/zero2.json, zero3*.json or auto")
    if cfg.plan.zero_stage:
        if stage is not None and stage != cfg.plan.zero_stage:
            problems.append(
                f"plan.zero_stage={cfg.plan.zero_stage} but the DeepSpeed config has stage {stage}: pass "
                f"--ds ds_configs/zero{cfg.plan.zero_stage}.json (or --ds auto), or drop plan.zero_stage"
            )
        stage = cfg.plan.zero_stage
    if cfg.plan.offload != "auto":
        if offload is not None and offload != cfg.plan.offload:
            problems.append(f"plan.offload={cfg.plan.offload} but the DeepSpeed config offloads '{offload}'")
        offload = cfg.plan.offload
    checkpointing = cfg.model.gradient_checkpointing
    pins = {
        "zero_stage": stage,
        "offload": offload,
        "checkpointing": None if checkpointing == "auto" else bool(checkpointing),
    }
    return pins, problems


def _allowed(c: Candidate, pins: dict, quantization: str) -> bool:
    if pins["zero_stage"] is not None and c.zero_stage != pins["zero_stage"]:
        return False
    if pins["offload"] is not None and c.offload != pins["offload"]:
        return False
    if pins["checkpointing"] is not None and c.checkpointing != pins["checkpointing"]:
        return False
    if c.offload == "optimizer+params" and (c.zero_stage != 3 or quantization == "nf4"):
        return False
    return True


def make_plan(
    cfg: RunConfig,
    ds_config: dict,
    hardware: Hardware | int,
    model_config: dict,
    seq: SequenceStats | None = None,
    coefficients: Coefficients = COEFFICIENTS,
) -> Plan:
    """The plan for `cfg` on `hardware` with the DeepSpeed JSON `ds_config`; raises PlanError.

    `hardware` may be a rank count alone (no memory information: nothing is planned from memory, as on CPU).
    """
    if isinstance(hardware, int):
        hardware = Hardware(gpus_per_node=hardware, nodes=1, gpu_memory_bytes=None, source="rank count")
    seq = seq or sequence_stats(cfg)
    pins, problems = _pins(cfg, ds_config)
    pinned_budget = cfg.train.micro_batch_tokens
    longest = max(seq.longest, max_sample_audio_positions(cfg.data))
    if pinned_budget and pinned_budget < longest:
        problems.append(
            f"micro-batch budget {pinned_budget} is below the longest sample ({longest} positions, "
            f"{seq.source}); raise train.micro_batch_tokens or lower data.max_seconds"
        )
    if problems:
        raise PlanError("cannot plan this run:\n" + "\n".join(f"  - {p}" for p in problems))
    world = hardware.world_size
    trainable = lora_parameter_count(model_config, cfg.lora.target_modules, cfg.lora.r)
    common = dict(
        world_size=world,
        nodes=hardware.nodes,
        dtype=cfg.model.dtype,
        quantization=cfg.model.quantization,
        trainable_parameters=trainable,
        global_batch_target=cfg.train.global_batch_tokens,
        hardware=describe_hardware(hardware),
        sequences=f"longest {longest:,} positions ({seq.source})",
    )
    # The usual ways first; the others (optimizer offload alone, ZeRO-3 without checkpointing, ...) only when the
    # pinned values leave none of the usual ones.
    allowed = [c for c in CANDIDATES if _allowed(c, pins, cfg.model.quantization)] or [
        c for c in ALL_CANDIDATES if _allowed(c, pins, cfg.model.quantization)
    ]
    if not allowed:
        raise PlanError(f"no ZeRO stage/offload/checkpointing combination satisfies the pinned values {pins}")

    if hardware.gpu_memory_bytes is None:
        # No GPU: host memory is not what this model describes. Take the fastest allowed way and the given budget.
        choice = allowed[0]
        budget = pinned_budget or max(cfg.plan.useful_micro_batch_tokens, _round_up(longest))
        accumulation, budget = _accumulate(
            budget, world, cfg.train.global_batch_tokens, longest, pinned=bool(pinned_budget)
        )
        return Plan(
            zero_stage=choice.zero_stage,
            offload=choice.offload,
            micro_batch_tokens=budget,
            accumulation=accumulation,
            gradient_checkpointing=choice.checkpointing,
            reasons=("no GPU: memory not planned; the fastest allowed settings",),
            **common,
        )

    sizes = model_sizes(model_config, text_head=cfg.model.use_text_head)
    memory = MemoryModel(
        sizes=sizes,
        trainable=trainable,
        world_size=world,
        dtype=cfg.model.dtype,
        quantization=cfg.model.quantization,
        lora_dropout=cfg.lora.dropout,
        seq=seq,
        hidden=model_config["hidden_size"],
        intermediate=model_config["intermediate_size"],
        coefficients=coefficients,
    )
    capacity = hardware.gpu_memory_bytes * (1 - cfg.plan.memory_margin)
    share = math.ceil(cfg.train.global_batch_tokens / world) if cfg.train.global_batch_tokens else 0
    # Useful: the configured floor, and room for two of the longest samples (packing needs a choice of lengths),
    # but never past one rank's share of the global batch.
    wanted = max(cfg.plan.useful_micro_batch_tokens, 2 * longest)
    useful = _round_up(max(longest, min(wanted, share) if share else wanted))
    ceiling = max(
        useful, min(cfg.plan.max_micro_batch_tokens, _round_up(share) if share else cfg.plan.max_micro_batch_tokens)
    )
    reasons = []
    if pinned_budget:
        fits = [c for c in allowed if memory.peak(c, pinned_budget) <= capacity]
        if not fits:
            raise PlanError(_infeasible(cfg, memory, allowed, capacity, longest, pinned_budget, hardware, model_config))
        choice, budget = fits[0], pinned_budget
        reasons += [
            f"{c.describe()}: predicted {memory.peak(c, budget) / 1e9:.1f} GB > {capacity / 1e9:.1f} GB usable"
            for c in allowed[: allowed.index(choice)]
        ]
        reasons.append(f"budget pinned by train.micro_batch_tokens={pinned_budget}")
    else:
        budgets = {c: memory.largest_budget(c, capacity) for c in allowed}
        reaching = [c for c in allowed if budgets[c] >= useful]
        if reaching:
            choice = reaching[0]
            cap = ceiling if choice == allowed[0] else useful
            budget = min(cap, budgets[choice])
        else:
            choice = max(allowed, key=lambda c: budgets[c])  # max() keeps the first (fastest) of equals
            budget = budgets[choice]
            if budget < longest:
                raise PlanError(_infeasible(cfg, memory, allowed, capacity, longest, 0, hardware, model_config))
            reasons.append(
                f"no way of running reaches the useful budget of {useful:,} positions; taking the largest that fits"
            )
        budget = max(budget, longest)
        for c in allowed[: allowed.index(choice)]:
            reasons.append(f"not {c.describe()}: fits only {budgets[c]:,} positions per micro-batch")
    accumulation, budget = _accumulate(
        budget, world, cfg.train.global_batch_tokens, longest, pinned=bool(pinned_budget)
    )
    return Plan(
        zero_stage=choice.zero_stage,
        offload=choice.offload,
        micro_batch_tokens=budget,
        accumulation=accumulation,
        gradient_checkpointing=choice.checkpointing,
        memory=tuple((t.name, t.at(budget)) for t in memory.terms(choice)),
        capacity_bytes=float(hardware.gpu_memory_bytes),
        margin=cfg.plan.memory_margin,
        reasons=tuple(reasons),
        **common,
    )


def _round_up(value: int) -> int:
    return -(-value // BUDGET_STEP) * BUDGET_STEP


def _accumulate(budget: int, world: int, global_target: int, longest: int, pinned: bool = False) -> tuple[int, int]:
    """(accumulation, budget): enough micro-batches for the global target, the budget trimmed to overshoot least.

    With a target G and the largest fitting budget b: accumulation a = ceil(G / (b x ranks)); the budget becomes the
    smallest multiple of BUDGET_STEP with a x budget x ranks >= G (never above b, never below the longest sample). A
    pinned budget is kept as it is.
    """
    if not global_target:
        return 1, budget
    if pinned:
        return max(1, math.ceil(global_target / (budget * world))), budget
    accumulation = max(1, math.ceil(global_target / (budget * world)))
    trimmed = _round_up(math.ceil(global_target / (accumulation * world)))
    return accumulation, max(longest, min(budget, trimmed))


def _infeasible(
    cfg: RunConfig,
    memory: MemoryModel,
    allowed: list[Candidate],
    capacity: float,
    longest: int,
    pinned_budget: int,
    hardware: Hardware,
    model_config: dict,
) -> str:
    """The error for a run that fits no allowed way, with what would fit."""
    need = pinned_budget or longest
    best = min(allowed, key=lambda c: memory.peak(c, need))
    lines = [
        f"this run does not fit {hardware.world_size} x {hardware.gpu_memory_bytes / GIB:.0f} GiB: the "
        f"smallest predicted peak is {memory.peak(best, need) / 1e9:.1f} GB ({best.describe()}, {need:,} "
        f"positions per micro-batch) against {capacity / 1e9:.1f} GB usable. What would fit:"
    ]
    every = [
        c
        for c in ALL_CANDIDATES
        if _allowed(c, {"zero_stage": None, "offload": None, "checkpointing": None}, cfg.model.quantization)
    ]
    unpinned = [c for c in every if c not in allowed and memory.peak(c, need) <= capacity]
    if unpinned:
        lines.append(f"  - {unpinned[0].describe()} (unpin the ZeRO stage / offload / checkpointing you set)")
    if pinned_budget and memory.largest_budget(best, capacity) >= longest:
        lines.append(f"  - train.micro_batch_tokens={memory.largest_budget(best, capacity)} (or 0 to plan it)")
    if cfg.model.quantization == "none":
        qlora = replace(memory, quantization="nf4")
        options = [c for c in every if c.offload != "optimizer+params"]
        if any(qlora.peak(c, need) <= capacity for c in options):
            lines.append("  - QLoRA: model.quantization=nf4 (4-bit base, ~0.5 byte per weight)")
    for gpus in (2, 4, 8, 16, 32, 64):
        if gpus <= hardware.world_size:
            continue
        wider = replace(memory, world_size=gpus)
        if any(wider.peak(c, need) <= capacity for c in every if c.zero_stage == 3):
            lines.append(f"  - {gpus} GPUs of this size with ZeRO-3")
            break
    seconds = _seconds_that_fit(cfg, memory, best, capacity)
    if seconds:
        lines.append(
            f"  - shorter samples: data.max_seconds={seconds[0]:g} with data.reference_max_seconds={seconds[1]:g}"
        )
    if len(lines) == 1:
        lines.append("  - nothing on this hardware: the frozen base alone is too big; use bigger GPUs")
    return "\n".join(lines)


def _seconds_that_fit(cfg: RunConfig, memory: MemoryModel, c: Candidate, capacity: float) -> tuple[float, float] | None:
    """(max_seconds, reference_max_seconds) scaled down together until one longest sample fits; None if none do."""
    fit = memory.largest_budget(c, capacity)
    data = cfg.data
    for scale in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        target, reference = round(data.max_seconds * scale, 1), round(data.reference_max_seconds * scale, 1)
        if target <= data.min_seconds or reference <= data.reference_min_seconds:
            break
        trial = replace(cfg.data, max_seconds=target, reference_max_seconds=reference)
        if sequence_stats(replace(cfg, data=trial)).longest <= fit:
            return target, reference
    return None
