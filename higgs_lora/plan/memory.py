"""The memory model: one GPU's predicted peak, term by term, for each way of running and micro-batch budget.

Pure: the measured coefficients, the ways of running the planner chooses between (`Candidate`), and
`MemoryModel.terms`, the table docs/planning.md ("How it decides") explains. Imports only plan.inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from higgs_lora.plan.inputs import ModelSizes, SequenceStats

GIB = 1024**3
BUDGET_STEP = 64
"""Planned budgets are multiples of this many positions (tidy numbers; no kernel needs it)."""


@dataclass(frozen=True)
class Coefficients:
    """Measured memory coefficients (bytes), with where they came from.

    Activation bytes per position per decoder layer are `a_h * hidden + a_i * intermediate + a_0`: the form fits
    the saved-tensor counts of three layer shapes exactly (bench/plan_calibration.py --method saved-tensors).
    """

    act_h: float = 20.03125
    act_i: float = 8.0
    act_0: float = 2048.0
    """No checkpointing, LoRA dropout 0: what autograd keeps per position per layer (bf16 base and adapters, SDPA).
    Refitted 2026-12-03 with the adapters in bf16, as DeepSpeed's bf16 engine runs them (the 2026-11-26 fit,
    40.03h + 10I, had PEFT's fp32 adapters keep an fp32 copy of every projection's input); exact constant 1728,
    rounded up. Released width: 128,800 B measured by saved tensors, 128,954 B by bench/plan_memory.py."""
    dropout_h: float = 20.0
    dropout_i: float = 2.0
    """Extra with LoRA dropout > 0: PEFT keeps a dropped copy of each adapted projection's input, and its mask."""
    checkpoint_h: float = 2.0
    """With checkpointing: each layer keeps only its input (bf16 hidden states)."""
    checkpoint_tail_h: float = 6.3
    """With checkpointing: the last layer's output (bf16, 2h) and the final norm's fp32 copy of it (4h), kept for
    the head's backward; measured 6.2-6.4 h at 1.5k/3k widths (bench/plan_memory.py, 2026-12-03). Without
    checkpointing the same bytes are already inside `28 * per_layer`: layer 0's input norm saves nothing (its input,
    the frozen embedding, needs no gradient), which the final norm makes up almost exactly (the measured intercept
    beyond the logits is 0.01-0.2 h)."""
    layer_backward_h: float = 17.5
    """Without checkpointing: what a layer's backward holds beyond the activations at its peak, per position (the
    RMSNorm backward's fp32 copies of the hidden states); independent of the MLP size. Measured 15.4-17.5 h at
    1.6k-16k positions, released width (bench/plan_memory.py, 2026-12-03)."""
    recompute_extra_h: float = 1.0
    """With checkpointing: beyond the recomputed layer's activations at its backward's peak (the first gradient of
    the layer's output); measured -0.1 to +1.2 h."""
    logit_bytes: float = 4.0
    """Per labelled position and audio-head output, kept from the forward: the fp32 log-probabilities the loss's
    backward reads (the measured activations' intercept at zero layers is exactly this)."""
    head_backward_bytes: float = 11.0
    """Per labelled position and audio-head output, during the head's backward: the fp32 logit gradient, its
    softmax temporary and the gradient into the hidden states (measured 10.8-10.9, 2026-12-03). The backward's
    peak is either here or in a layer, whichever is larger: the head's at small widths, a layer's at the released
    one."""
    cuda_context_gib: float = 0.6
    """CUDA context, cuBLAS workspaces and NCCL buffers outside PyTorch's allocator."""
    source: str = (
        "activations: saved-tensor counts, full-size layer shapes, bf16 base and adapters, CPU, 2026-12-03 "
        "(bench/plan_calibration.py --method saved-tensors); backward working set: step peaks at four widths, CPU, "
        "2026-12-03 (bench/plan_memory.py); CUDA context: analytic. "
        "GPU calibration pending (no GPU was available)."
    )


COEFFICIENTS = Coefficients()


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
    Candidate(2, "optimizer", False),
    Candidate(2, "optimizer", True),
    Candidate(3, "none", False),
    Candidate(3, "optimizer", False),
    Candidate(3, "optimizer", True),
    Candidate(3, "optimizer+params", False),
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
        """The per-GPU memory terms of candidate `c` (docs/planning.md), in bytes."""
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
        kept_logits = k.logit_bytes * s.audio_outputs * self.seq.labelled_fraction
        head_backward = k.head_backward_bytes * s.audio_outputs * self.seq.labelled_fraction
        if c.checkpointing:
            terms.append(
                Term("activations (layer inputs)", 0.0, (s.num_layers * k.checkpoint_h + k.checkpoint_tail_h) * h)
            )
            terms.append(Term("recomputed layer", 0.0, per_layer))
            # The peak is in the recomputed layer's backward or the head's, whichever holds more.
            working = max(k.recompute_extra_h * h, head_backward - per_layer)
        else:
            terms.append(Term("activations", 0.0, s.num_layers * per_layer))
            working = max(k.layer_backward_h * h, head_backward)
        terms.append(Term("audio logits", 0.0, kept_logits))
        dequant = 2 * 2 * s.largest_linear if self.quantization == "nf4" else 0.0
        terms.append(Term("backward working set", dequant, working))
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
