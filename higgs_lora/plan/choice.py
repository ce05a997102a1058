"""The run's plan: ZeRO stage, offload, gradient checkpointing, micro-batch token budget, gradient accumulation and
the resolved DeepSpeed config, chosen from a model of GPU memory (docs/planning.md, ../MEMORY_MODEL in the design).

Pure: everything here reads numbers (the run config, the DeepSpeed JSON, the checkpoint's config.json, a
`Hardware` description, sequence statistics), never torch or a process group, so every rank computes the same plan,
`python -m higgs_lora.plan` prints it without a GPU, and it is tested with tables of cases. Detecting the hardware
(torch.cuda, launcher and SLURM variables) is the one impure step, kept in `detect_hardware`.

The choice, in order of speed (MEMORY_MODEL.md):
  1. ZeRO-2 without checkpointing, if it reaches the useful budget (`plan.useful_micro_batch_tokens`, 2048, or
     two of the longest samples if more);
  2. ZeRO-2 with checkpointing; 3. ZeRO-3 with checkpointing; 4. ZeRO-3 with checkpointing and parameter offload;
each taken if it reaches the useful budget; when none does, the one with the largest budget that still holds the
longest sample; when none holds it, an error saying what would fit. Values the user pinned (the stage in
zero3.json, `train.micro_batch_tokens`, `model.gradient_checkpointing: true`, `plan.offload`) remove the
candidates that contradict them. The budget is then the largest predicted to fit, capped at the useful budget
for the slower candidates (beyond it a bigger micro-batch buys little; and the cap makes "more memory never gives a
smaller budget" hold across the switch between candidates), and at `plan.max_micro_batch_tokens` for the fastest.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from higgs_lora.errors import UserError
from higgs_lora.constants import DELAY_POSITIONS, FRAMES_PER_SECOND
from higgs_lora.config import RunConfig, max_sample_audio_positions

GIB = 1024 ** 3
BUDGET_STEP = 64
"""Planned budgets are multiples of this many positions (tidy numbers; no kernel needs it)."""
PROMPT_OVERHEAD_TOKENS = 64
"""Template tokens of one zero-shot sample besides the two texts (system prompt, turn markers, audio BOS/EOS and
delay tokens): 40-50 with the shipped template; rounded up."""
TEXT_TOKENS_PER_LETTER = 0.5
"""Upper estimate of tokens per letter of normalised Arabic text (a BPE token holds at least one letter and
Llama-3's usually several; a deliberately high guess, used only when no cache gives the real lengths)."""

RELEASED_MODEL_CONFIG = {
    "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8,
    "head_dim": 128, "num_hidden_layers": 28, "vocab_size": 128256, "num_codebooks": 8, "codebook_size": 1026,
    "tie_word_embeddings": False,
}
"""The released checkpoint's config.json numbers the planner reads (`--model released` plans without weights)."""


class PlanError(UserError, ValueError):
    """The run cannot be planned as configured; the message says what to change."""


# ------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Coefficients:
    """Measured memory coefficients (bytes), with where they came from.

    Activation bytes per position per decoder layer are `a_h * hidden + a_i * intermediate + a_0`: the form fits
    the saved-tensor counts of three layer shapes exactly (bench/plan_calibration.py --method saved-tensors).
    """

    act_h: float = 40.03125
    act_i: float = 10.0
    act_0: float = 2048.0
    """No checkpointing, LoRA dropout 0: what autograd keeps per position per layer (bf16, SDPA)."""
    dropout_h: float = 24.0
    dropout_i: float = 4.0
    """Extra with LoRA dropout > 0: PEFT keeps a dropped copy of each adapted projection's input, and its mask."""
    checkpoint_h: float = 2.0
    """With checkpointing: each layer keeps only its input (bf16 hidden states)."""
    transient_h: float = 6.0
    transient_i: float = 8.0
    """Backward working set of one layer per position (gradients of the MLP intermediates and of the hidden
    states), analytic until calibrated on a GPU."""
    logit_bytes: float = 12.0
    """Per labelled position and audio-head output: fp32 logits kept for the loss (4), their gradient (4), the
    bf16 copy and softmax temporaries (4)."""
    cuda_context_gib: float = 0.6
    """CUDA context, cuBLAS workspaces and NCCL buffers outside PyTorch's allocator."""
    source: str = ("activations: saved-tensor counts, full-size layer shapes, bf16, CPU, 2026-11-26 "
                   "(bench/plan_calibration.py --method saved-tensors); transient and context: analytic. "
                   "GPU calibration pending (no GPU was available).")


COEFFICIENTS = Coefficients()


@dataclass(frozen=True)
class Hardware:
    """What the run has, per GPU and in all."""

    gpus_per_node: int
    nodes: int
    gpu_memory_bytes: int | None
    """None: no GPU (a CPU run); memory is not planned."""
    name: str = ""
    source: str = ""
    """How it was found ('given', 'torch.cuda + launcher', ...), for the printout."""

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class SequenceStats:
    """What the planner needs to know about sample lengths."""

    longest: int
    """Positions of the longest possible sample (text included): the budget must hold it."""
    labelled_fraction: float
    """Upper bound of the fraction of a micro-batch's positions that carry audio labels (and so logits)."""
    source: str


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of the model's parts, from config.json alone."""

    embeddings: int
    """Text and audio-codebook embeddings."""
    heads: int
    """Audio head, plus the text head when it is loaded."""
    layer_linear: int
    """Linear weights of one decoder layer (attention, text MLP, audio MLP): what NF4 quantises."""
    layer_other: int
    """Norm weights of one decoder layer."""
    num_layers: int
    final_norm: int
    largest_linear: int
    """The largest single linear weight (4-bit layers dequantise it whole, in forward and again in backward)."""
    audio_outputs: int
    """Audio-head outputs per position: codebooks x codebook size (8 x 1026)."""

    @property
    def total(self) -> int:
        return self.embeddings + self.heads + self.num_layers * (self.layer_linear + self.layer_other) + self.final_norm

    @property
    def layer(self) -> int:
        return self.layer_linear + self.layer_other


def model_sizes(model_config: dict, text_head: bool) -> ModelSizes:
    """Parameter counts of a HiggsAudioV2ForConditionalGeneration described by `model_config`."""
    h = model_config["hidden_size"]
    inter = model_config["intermediate_size"]
    heads = model_config["num_attention_heads"]
    kv = model_config.get("num_key_value_heads", heads)
    head_dim = model_config.get("head_dim") or h // heads
    audio_rows = model_config.get("num_codebooks", 8) * model_config.get("codebook_size", 1026)
    text = model_config["vocab_size"] * h
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    mlp = 3 * h * inter
    tied = model_config.get("tie_word_embeddings", False)
    return ModelSizes(
        embeddings=text + audio_rows * h,
        heads=audio_rows * h + (text if text_head and not tied else 0),
        layer_linear=attention + 2 * mlp,
        layer_other=4 * h,  # input and post-attention norms of the text and the audio path
        num_layers=model_config["num_hidden_layers"],
        final_norm=h,
        largest_linear=max(h * inter, h * heads * head_dim),
        audio_outputs=audio_rows,
    )


def lora_parameter_count(model_config: dict, target_modules: list[str], r: int) -> int:
    """Trainable parameters of LoRA with rank `r` on `target_modules` of every layer (both MLPs for gate/up/down)."""
    hidden = model_config["hidden_size"]
    intermediate = model_config["intermediate_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads", heads)
    head_dim = model_config.get("head_dim") or hidden // heads
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    mlp_copies = 2  # text MLP and audio MLP in every layer of the released model
    per_layer = 0
    for name in target_modules:
        if name in shapes:
            fan_in, fan_out = shapes[name]
            copies = mlp_copies if name in ("gate_proj", "up_proj", "down_proj") else 1
            per_layer += copies * r * (fan_in + fan_out)
    total = per_layer * model_config["num_hidden_layers"]
    audio_rows = model_config.get("num_codebooks", 8) * model_config.get("codebook_size", 1026)
    if "audio_lm_head" in target_modules:
        total += r * (hidden + audio_rows)
    return total


def sequence_stats(cfg: RunConfig, longest_target_frames: int | None = None,
                   longest_text_letters: int | None = None) -> SequenceStats:
    """Sample lengths from the config's duration bounds, tightened by the cache's longest clip when given."""
    data = cfg.data
    reference_frames = round(data.reference_max_seconds * FRAMES_PER_SECOND)
    target_frames = round(data.max_seconds * FRAMES_PER_SECOND)
    source = f"config (data.max_seconds={data.max_seconds}, data.reference_max_seconds={data.reference_max_seconds})"
    letters = data.max_letters_per_second * (data.max_seconds + data.reference_max_seconds)
    if longest_target_frames is not None:
        target_frames = min(target_frames, longest_target_frames)
        reference_frames = min(reference_frames, longest_target_frames)
        source = f"cache (longest clip {longest_target_frames / FRAMES_PER_SECOND:.1f} s)"
        if longest_text_letters is not None:
            letters = 2 * longest_text_letters
    text = math.ceil(TEXT_TOKENS_PER_LETTER * letters) + PROMPT_OVERHEAD_TOKENS
    longest = target_frames + reference_frames + 2 * DELAY_POSITIONS + text
    shortest_reference = round(data.reference_min_seconds * FRAMES_PER_SECOND) + DELAY_POSITIONS
    labelled = (target_frames + DELAY_POSITIONS) / (target_frames + DELAY_POSITIONS + shortest_reference
                                                    + PROMPT_OVERHEAD_TOKENS)
    return SequenceStats(longest=longest, labelled_fraction=min(1.0, labelled), source=source)


def cache_sequence_stats(cfg: RunConfig, cache_dir: str | Path) -> SequenceStats:
    """`sequence_stats` with the longest clip and transcript of a prepared cache; the config's if there is none."""
    from higgs_lora.data.cache import load_cache

    try:
        cache = load_cache(cache_dir)
    except Exception:  # no cache yet (planning before `prepare`): the config's bounds are the upper bound
        return sequence_stats(cfg)
    if len(cache) == 0:
        return sequence_stats(cfg)
    frames = max(cache["num_frames"])
    letters = max(len(t) for t in cache["text_normalized"])
    return sequence_stats(cfg, frames, letters)


# ------------------------------------------------------------------------------------------- memory model


@dataclass(frozen=True)
class Candidate:
    """One way to run: what the planner chooses between."""

    zero_stage: int
    offload: str
    """'none', 'optimizer' or 'optimizer+params'."""
    checkpointing: bool

    def describe(self) -> str:
        text = f"ZeRO-{self.zero_stage}, " + ("checkpointing" if self.checkpointing else "no checkpointing")
        return text + ("" if self.offload == "none" else f", offload {self.offload}")


CANDIDATES = (
    Candidate(2, "none", False),
    Candidate(2, "none", True),
    Candidate(3, "none", True),
    Candidate(3, "optimizer+params", True),
)
"""In order of speed; every other combination is reachable only by pinning it."""

ALL_CANDIDATES = CANDIDATES + (
    Candidate(2, "optimizer", False), Candidate(2, "optimizer", True), Candidate(3, "none", False),
    Candidate(3, "optimizer", False), Candidate(3, "optimizer", True), Candidate(3, "optimizer+params", False),
)


@dataclass(frozen=True)
class Term:
    """One line of the memory table: fixed bytes plus bytes per position of the micro-batch."""

    name: str
    fixed: float
    per_position: float = 0.0

    def at(self, budget: int) -> float:
        return self.fixed + self.per_position * budget


@dataclass(frozen=True)
class MemoryModel:
    """What the planner needs to predict one GPU's peak memory for any candidate and budget."""

    sizes: ModelSizes
    trainable: int
    world_size: int
    dtype: str
    quantization: str
    lora_dropout: float
    seq: SequenceStats
    hidden: int
    intermediate: int
    coefficients: Coefficients = COEFFICIENTS

    def terms(self, c: Candidate) -> list[Term]:
        """The per-GPU memory terms of candidate `c` (MEMORY_MODEL.md), in bytes."""
        k, n, s = self.coefficients, self.world_size, self.sizes
        width = {"bf16": 2, "fp16": 2, "fp32": 4}[self.dtype]
        p_t = self.trainable
        layers_linear = s.num_layers * s.layer_linear
        unquantised = s.embeddings + s.heads + s.num_layers * s.layer_other + s.final_norm
        if self.quantization == "nf4":
            # 4 bits per weight + one absmax byte per 64 (double quantisation: fp32 absmax-of-absmax per 256 blocks).
            base = 0.5 * layers_linear + layers_linear / 64 + 4 * layers_linear / (64 * 256) + width * unquantised
        else:
            base = width * s.total
        terms = []
        offload_params = c.offload == "optimizer+params"
        if c.zero_stage == 3:
            # Shards, plus what is gathered at once: the layer being run and the one prefetched, or the embedding.
            live = width * max(2 * s.layer, s.embeddings)
            terms.append(Term("frozen base (shard)", 0.0 if offload_params else base / n))
            terms.append(Term("gathered parameters", live))
        else:
            terms.append(Term("frozen base", base))
        sharded = 3 if c.zero_stage == 3 else 2
        lora_weights = width * p_t / (n if sharded == 3 else 1)
        master_and_adam = 12 * p_t / n
        lora_grads = width * p_t / n
        terms.append(Term("LoRA weights", lora_weights))
        terms.append(Term("LoRA gradients (partition)", lora_grads))
        terms.append(Term("fp32 master + Adam m, v", 0.0 if c.offload != "none" else master_and_adam))
        bucket = bucket_size(p_t)
        buffers = 2 * width * bucket  # two reduce buckets with overlap_comm
        if c.zero_stage == 3:
            buffers += width * prefetch_bucket_size(self.hidden)
        terms.append(Term("ZeRO buffers", buffers))
        h, i = self.hidden, self.intermediate
        per_layer = k.act_h * h + k.act_i * i + k.act_0
        if self.lora_dropout > 0:
            per_layer += k.dropout_h * h + k.dropout_i * i
        if c.checkpointing:
            kept = s.num_layers * k.checkpoint_h * h
            terms.append(Term("activations (layer inputs)", 0.0, kept))
            terms.append(Term("recomputed layer", 0.0, per_layer))
        else:
            terms.append(Term("activations", 0.0, s.num_layers * per_layer))
        terms.append(Term("audio logits", 0.0, k.logit_bytes * s.audio_outputs * self.seq.labelled_fraction))
        transient = k.transient_h * h + k.transient_i * i
        dequant = 2 * 2 * s.largest_linear if self.quantization == "nf4" else 0.0
        terms.append(Term("backward working set", dequant, transient))
        terms.append(Term("CUDA context", k.cuda_context_gib * GIB))
        return terms

    def peak(self, c: Candidate, budget: int) -> float:
        return sum(t.at(budget) for t in self.terms(c))

    def largest_budget(self, c: Candidate, capacity: float) -> int:
        """The largest budget (a multiple of BUDGET_STEP) whose predicted peak is at most `capacity`; 0 if none."""
        terms = self.terms(c)
        fixed = sum(t.fixed for t in terms)
        per_position = sum(t.per_position for t in terms)
        if capacity <= fixed:
            return 0
        return int((capacity - fixed) // per_position) // BUDGET_STEP * BUDGET_STEP


def bucket_size(trainable: int) -> int:
    """Reduce/all-gather bucket elements: near the LoRA gradient size, not DeepSpeed's 5e8 default (1 GB in bf16)."""
    return int(min(5e8, max(1e6, trainable)))


def prefetch_bucket_size(hidden: int) -> int:
    return int(0.9 * hidden * hidden)


# ---------------------------------------------------------------------------------------------- the plan


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
            ("global batch", f"<= {self.global_batch_tokens:,} positions per optimizer step"
             + (f" (asked: {self.global_batch_target:,})" if self.global_batch_target else "")),
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


def read_model_config(model_path: str | Path) -> dict:
    """The checkpoint's config.json (the planner's source for layer sizes); 'released' gives the released numbers."""
    if str(model_path) == "released":
        return dict(RELEASED_MODEL_CONFIG)
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise PlanError(f"{path} not found: model.path must be a local checkpoint directory "
                        "(or plan with --model released for the released model's sizes)")
    return json.loads(path.read_text(encoding="utf-8"))


def ds_stage_and_offload(ds_config: dict) -> tuple[int | None, str | None]:
    """(ZeRO stage, offload) a DeepSpeed JSON pins; None where it says "auto" (or nothing)."""
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", "auto")
    stage = None if stage == "auto" else int(stage)
    optimizer, params = (zero.get(key, {}).get("device", "auto") for key in ("offload_optimizer", "offload_param"))
    offloaded = lambda device: device not in ("auto", None, "none")  # noqa: E731
    if offloaded(params):
        return stage, "optimizer+params"
    if "auto" in (optimizer, params):
        return stage, None  # open (with the optimizer pinned to the CPU, '+params' would still fit the JSON)
    return stage, "optimizer" if offloaded(optimizer) else "none"


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
    pins = {"zero_stage": stage, "offload": offload,
            "checkpointing": None if checkpointing == "auto" else bool(checkpointing)}
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


def make_plan(cfg: RunConfig, ds_config: dict, hardware: Hardware | int, model_config: dict,
              seq: SequenceStats | None = None, coefficients: Coefficients = COEFFICIENTS) -> Plan:
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
        problems.append(f"micro-batch budget {pinned_budget} is below the longest sample ({longest} positions, "
                        f"{seq.source}); raise train.micro_batch_tokens or lower data.max_seconds")
    if problems:
        raise PlanError("cannot plan this run:\n" + "\n".join(f"  - {p}" for p in problems))
    world = hardware.world_size
    trainable = lora_parameter_count(model_config, cfg.lora.target_modules, cfg.lora.r)
    common = dict(world_size=world, nodes=hardware.nodes, dtype=cfg.model.dtype, quantization=cfg.model.quantization,
                  trainable_parameters=trainable, global_batch_target=cfg.train.global_batch_tokens,
                  hardware=describe_hardware(hardware), sequences=f"longest {longest:,} positions ({seq.source})")
    # The usual ways first; the others (optimizer offload alone, ZeRO-3 without checkpointing, ...) only when the
    # pinned values leave none of the usual ones.
    allowed = ([c for c in CANDIDATES if _allowed(c, pins, cfg.model.quantization)]
               or [c for c in ALL_CANDIDATES if _allowed(c, pins, cfg.model.quantization)])
    if not allowed:
        raise PlanError(f"no ZeRO stage/offload/checkpointing combination satisfies the pinned values {pins}")

    if hardware.gpu_memory_bytes is None:
        # No GPU: host memory is not what this model describes. Take the fastest allowed way and the given budget.
        choice = allowed[0]
        budget = pinned_budget or max(cfg.plan.useful_micro_batch_tokens, _round_up(longest))
        accumulation, budget = _accumulate(budget, world, cfg.train.global_batch_tokens, longest,
                                           pinned=bool(pinned_budget))
        return Plan(zero_stage=choice.zero_stage, offload=choice.offload, micro_batch_tokens=budget,
                    accumulation=accumulation, gradient_checkpointing=choice.checkpointing,
                    reasons=("no GPU: memory not planned; the fastest allowed settings",), **common)

    sizes = model_sizes(model_config, text_head=cfg.model.use_text_head)
    memory = MemoryModel(sizes=sizes, trainable=trainable, world_size=world, dtype=cfg.model.dtype,
                         quantization=cfg.model.quantization, lora_dropout=cfg.lora.dropout, seq=seq,
                         hidden=model_config["hidden_size"], intermediate=model_config["intermediate_size"],
                         coefficients=coefficients)
    capacity = hardware.gpu_memory_bytes * (1 - cfg.plan.memory_margin)
    share = math.ceil(cfg.train.global_batch_tokens / world) if cfg.train.global_batch_tokens else 0
    # Useful: the configured floor, and room for two of the longest samples (packing needs a choice of lengths),
    # but never past one rank's share of the global batch.
    wanted = max(cfg.plan.useful_micro_batch_tokens, 2 * longest)
    useful = _round_up(max(longest, min(wanted, share) if share else wanted))
    ceiling = max(useful, min(cfg.plan.max_micro_batch_tokens, _round_up(share) if share else
                              cfg.plan.max_micro_batch_tokens))
    reasons = []
    if pinned_budget:
        fits = [c for c in allowed if memory.peak(c, pinned_budget) <= capacity]
        if not fits:
            raise PlanError(_infeasible(cfg, memory, allowed, capacity, longest, pinned_budget, hardware, model_config))
        choice, budget = fits[0], pinned_budget
        reasons += [f"{c.describe()}: predicted {memory.peak(c, budget) / 1e9:.1f} GB > {capacity / 1e9:.1f} GB usable"
                    for c in allowed[:allowed.index(choice)]]
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
            reasons.append(f"no way of running reaches the useful budget of {useful:,} positions; "
                           f"taking the largest that fits")
        budget = max(budget, longest)
        for c in allowed[:allowed.index(choice)]:
            reasons.append(f"not {c.describe()}: fits only {budgets[c]:,} positions per micro-batch")
    accumulation, budget = _accumulate(budget, world, cfg.train.global_batch_tokens, longest,
                                       pinned=bool(pinned_budget))
    return Plan(zero_stage=choice.zero_stage, offload=choice.offload, micro_batch_tokens=budget,
                accumulation=accumulation, gradient_checkpointing=choice.checkpointing,
                memory=tuple((t.name, t.at(budget)) for t in memory.terms(choice)),
                capacity_bytes=float(hardware.gpu_memory_bytes), margin=cfg.plan.memory_margin,
                reasons=tuple(reasons), **common)


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


def _infeasible(cfg: RunConfig, memory: MemoryModel, allowed: list[Candidate], capacity: float, longest: int,
                pinned_budget: int, hardware: Hardware, model_config: dict) -> str:
    """The error for a run that fits no allowed way, with what would fit."""
    need = pinned_budget or longest
    best = min(allowed, key=lambda c: memory.peak(c, need))
    lines = [f"this run does not fit {hardware.world_size} x {hardware.gpu_memory_bytes / GIB:.0f} GiB: the "
             f"smallest predicted peak is {memory.peak(best, need) / 1e9:.1f} GB ({best.describe()}, {need:,} "
             f"positions per micro-batch) against {capacity / 1e9:.1f} GB usable. What would fit:"]
    every = [c for c in ALL_CANDIDATES if _allowed(c, {"zero_stage": None, "offload": None, "checkpointing": None},
                                                   cfg.model.quantization)]
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
        lines.append(f"  - shorter samples: data.max_seconds={seconds[0]:g} with data.reference_max_seconds="
                     f"{seconds[1]:g}")
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


# -------------------------------------------------------------------------------------- the DeepSpeed JSON

AUTO_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": "auto",
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "allgather_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": "auto",
        "stage3_max_reuse_distance": "auto",
        "stage3_gather_16bit_weights_on_model_save": False,
        "offload_optimizer": {"device": "auto"},
        "offload_param": {"device": "auto"},
    },
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}
"""What `--ds auto` starts from: every choice left to the planner."""

STAGE3_ONLY = ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
               "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save", "offload_param")


def load_ds_config(spec: str | Path) -> dict:
    """The DeepSpeed JSON named by `--ds`: a file, or 'auto' for `AUTO_DS_CONFIG`."""
    if str(spec) == "auto":
        return copy.deepcopy(AUTO_DS_CONFIG)
    path = Path(spec)
    if not path.is_file():
        raise PlanError(f"--ds {spec}: no such file (ds_configs/zero2.json, zero3.json, zero3_offload.json or auto)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PlanError(f"--ds {spec} is not valid JSON: {err}") from None


def resolve_ds_config(ds_config: dict, cfg: RunConfig, plan: Plan, model_config: dict) -> dict:
    """`ds_config` with every "auto" filled from the run config and the plan (a new dict)."""
    resolved = copy.deepcopy(ds_config)
    if resolved.get("gradient_allreduce_op", "mean") != "mean":
        # The loss is already scaled so that rank-averaged gradients are those of the global batch.
        raise PlanError("the DeepSpeed config sets gradient_allreduce_op to 'sum'; remove it (the default 'mean' "
                        "is what the global-batch loss normalisation expects)")
    hidden = model_config["hidden_size"]
    resolved["gradient_accumulation_steps"] = plan.accumulation
    resolved["train_micro_batch_size_per_gpu"] = 1  # our micro-batches hold a variable number of samples
    # In micro-batches: DeepSpeed checks train_batch_size = micro x accumulation x ranks at start-up, which catches
    # a launch on a different number of ranks than planned.
    resolved["train_batch_size"] = plan.accumulation * plan.world_size
    # Our optimizer is torch AdamW with a skip switch (higgs_lora.train.loop.SkippableAdamW); DeepSpeed only knows the
    # class by name, so it must be told the subclass is fine.
    resolved["zero_allow_untested_optimizer"] = True
    if resolved.get("gradient_clipping", "auto") == "auto":
        resolved["gradient_clipping"] = cfg.train.grad_clip
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.model.dtype)
    for key in ("bf16", "fp16"):
        section = resolved.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = key == precision
    zero = resolved.setdefault("zero_optimization", {})
    zero["stage"] = plan.zero_stage
    optimizer_device = "cpu" if plan.offload in ("optimizer", "optimizer+params") else "none"
    param_device = "cpu" if plan.offload == "optimizer+params" else "none"
    for key, device in (("offload_optimizer", optimizer_device), ("offload_param", param_device)):
        section = zero.setdefault(key, {})
        if section.get("device", "auto") == "auto":
            section["device"] = device
            if device == "cpu":
                section.setdefault("pin_memory", True)
    if plan.offload != "none":
        # DeepSpeed would swap in its CPU Adam (a C++ extension built at start-up); ours runs on the host as is.
        resolved.setdefault("zero_force_ds_cpu_optimizer", False)
    if plan.zero_stage != 3:
        for key in STAGE3_ONLY:
            zero.pop(key, None)
    bucket = bucket_size(plan.trainable_parameters)
    layer = model_sizes(model_config, text_head=False).layer
    defaults = {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": prefetch_bucket_size(hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
        # Two layers live at once (the one running and the one prefetched): what the memory model counts.
        "stage3_max_live_parameters": 2 * layer,
        "stage3_max_reuse_distance": 2 * layer,
    }
    for key, value in defaults.items():
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = sorted(_auto_keys(resolved))
    if leftover:
        raise PlanError(f"the DeepSpeed config has 'auto' values this version cannot fill: {leftover}")
    return resolved


def _auto_keys(node, prefix: str = "") -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _auto_keys(value, f"{prefix}{key}.")
    elif node == "auto":
        found.append(prefix.rstrip("."))
    return found


# ------------------------------------------------------------------------------------------------ hardware


def parse_memory(text: str) -> int:
    """Bytes from '24GiB', '80GB', '16g', '40' (GiB when no unit)."""
    units = {"gib": GIB, "gb": 10 ** 9, "g": GIB, "mib": 1024 ** 2, "mb": 10 ** 6, "tib": 1024 ** 4}
    value = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if value.endswith(unit):
            number, scale = value[: -len(unit)], units[unit]
            break
    else:
        number, scale = value, GIB
    try:
        amount = float(number)
    except ValueError:
        raise PlanError(f"cannot read GPU memory {text!r}; write e.g. 24GiB, 80GB or 40") from None
    if amount <= 0:
        raise PlanError(f"GPU memory {text!r} must be positive")
    return int(amount * scale)


def detect_hardware(cfg: RunConfig, env: dict[str, str] | None = None, cuda: tuple[int, int, str] | None = None,
                    world_size: int | None = None) -> Hardware:
    """The hardware: what `plan.*` gives, else what the launcher / SLURM variables and torch.cuda say.

    `cuda` is (devices on this node, bytes per device, name), None to ask torch; `world_size` is the process
    group's (training), None for a dry run, which then plans what `plan.*`, SLURM or the visible GPUs describe.
    """
    env = dict(os.environ if env is None else env)
    if cuda is None:
        cuda = _cuda_info()
    count, memory, name = cuda
    sources = []
    per_node = cfg.plan.gpus_per_node or _int(env.get("LOCAL_WORLD_SIZE")) or _slurm_tasks_per_node(env) or count or 1
    nodes = cfg.plan.nodes or _int(env.get("SLURM_NNODES")) or _int(env.get("NNODES")) or 1
    if world_size is not None and world_size != per_node * nodes:
        # The process group is the truth in a running job; derive nodes from it.
        nodes = max(1, world_size // per_node) if world_size % per_node == 0 else 1
        per_node = world_size // nodes
    sources.append("given" if cfg.plan.gpus_per_node or cfg.plan.nodes else "launcher/SLURM/torch.cuda")
    if cfg.plan.gpu_memory_gib:
        memory_bytes: int | None = int(cfg.plan.gpu_memory_gib * GIB)
        name = name or "GPU"
        sources.append("memory given")
    elif count:
        memory_bytes = memory
        sources.append("memory from torch.cuda")
    else:
        memory_bytes = None
        name = "CPU"
    return Hardware(gpus_per_node=per_node, nodes=nodes, gpu_memory_bytes=memory_bytes, name=name,
                    source=", ".join(sources))


def describe_hardware(hardware: Hardware) -> str:
    if hardware.gpu_memory_bytes is None:
        return f"{hardware.world_size} CPU process{'es' if hardware.world_size > 1 else ''} (memory not planned)"
    return (f"{hardware.nodes} node(s) x {hardware.gpus_per_node} x {hardware.name or 'GPU'} "
            f"{hardware.gpu_memory_bytes / GIB:.1f} GiB ({hardware.source})")


def _cuda_info() -> tuple[int, int, str]:
    try:
        import torch
    except ImportError:
        return 0, 0, ""
    if not torch.cuda.is_available():
        return 0, 0, ""
    props = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), int(props.total_memory), props.name


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _slurm_tasks_per_node(env: dict[str, str]) -> int:
    """Tasks per node from SLURM ('8' or '8(x2)'), else its GPUs on this node."""
    tasks = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    head = tasks.split("(")[0].split(",")[0]
    return _int(head) or _int(env.get("SLURM_GPUS_ON_NODE")) or _int(env.get("SLURM_GPUS_PER_NODE", "").split(":")[-1])


# ------------------------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    """`python -m higgs_lora.plan`: print the plan for a config on given or detected hardware (a dry run)."""
    import argparse
    import sys

    from higgs_lora.config import ConfigError, add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(
        prog="python -m higgs_lora.plan",
        description="Plan a run (ZeRO stage, offload, checkpointing, micro-batch, accumulation) and print the "
                    "predicted memory per GPU, without loading a model. Hardware: as given, else detected.",
        epilog="example: python -m higgs_lora.plan --config configs/arabic_lora.yaml --model released "
               "--gpus 8 --gpu-mem 24GiB --nodes 2",
    )
    parser.add_argument("--ds", default="auto", help="DeepSpeed JSON to plan around, or 'auto' (default)")
    parser.add_argument("--gpus", type=int, help="GPUs per node (default: detected)")
    parser.add_argument("--gpu-mem", help="memory per GPU, e.g. 24GiB, 80GB (default: detected)")
    parser.add_argument("--nodes", type=int, help="nodes (default: detected, else 1)")
    parser.add_argument("--model", help="checkpoint directory whose config.json gives the sizes, or 'released' for "
                                        "the released model's (default: model.path)")
    parser.add_argument("--json", help="also write the plan and the resolved DeepSpeed config to this file")
    parser.add_argument("--show-ds", action="store_true", help="print the resolved DeepSpeed config")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in ((args.gpus, "plan.gpus_per_node"), (args.nodes, "plan.nodes")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        if args.gpu_mem:
            overrides.append(f"plan.gpu_memory_gib={parse_memory(args.gpu_mem) / GIB}")
        args.overrides = overrides
        cfg = config_from_args(args)
        model_config = read_model_config(args.model or cfg.model.path)
        ds_config = load_ds_config(args.ds)
        from higgs_lora.data.cache import cache_dir_of

        seq = cache_sequence_stats(cfg, cache_dir_of(cfg)) if cfg.data.corpus else sequence_stats(cfg)
        plan = make_plan(cfg, ds_config, detect_hardware(cfg), model_config, seq)
        planned = replace(cfg, model=replace(cfg.model, gradient_checkpointing=plan.gradient_checkpointing))
        resolved = resolve_ds_config(ds_config, planned, plan, model_config)
    except (ConfigError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.describe())
    if args.show_ds:
        print("\nresolved DeepSpeed config:\n" + json.dumps(resolved, indent=2))
    if args.json:
        from higgs_lora.files import atomic_write_json

        atomic_write_json(Path(args.json), {"plan": plan.to_dict(), "ds_config": resolved})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
