"""What the planner reads: sample lengths (from the config or a prepared cache) and the model's sizes (from its
config.json, or the released model's numbers).

Pure: numbers in, numbers out; may import config, constants and (lazily) data's cache reader, never torch.
See docs/planning.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from higgs_lora.config import RunConfig
from higgs_lora.constants import DELAY_POSITIONS, FRAMES_PER_SECOND
from higgs_lora.plan.errors import PlanError

PROMPT_OVERHEAD_TOKENS = 64
"""Template tokens of one zero-shot sample besides the two texts (system prompt, turn markers, audio BOS/EOS and
delay tokens): 40-50 with the shipped template; rounded up."""
TEXT_TOKENS_PER_LETTER = 0.5
"""Upper estimate of tokens per letter of normalised Arabic text (a BPE token holds at least one letter and
Llama-3's usually several; a deliberately high guess, used only when no cache gives the real lengths)."""

RELEASED_MODEL_CONFIG = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 28,
    "vocab_size": 128256,
    "num_codebooks": 8,
    "codebook_size": 1026,
    "tie_word_embeddings": False,
}
"""The released checkpoint's config.json numbers the planner reads (`--model released` plans without weights)."""


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


def sequence_stats(
    cfg: RunConfig, longest_target_frames: int | None = None, longest_text_letters: int | None = None
) -> SequenceStats:
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
    labelled = (target_frames + DELAY_POSITIONS) / (
        target_frames + DELAY_POSITIONS + shortest_reference + PROMPT_OVERHEAD_TOKENS
    )
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


def read_model_config(model_path: str | Path) -> dict:
    """The checkpoint's config.json (the planner's source for layer sizes); 'released' gives the released numbers."""
    if str(model_path) == "released":
        return dict(RELEASED_MODEL_CONFIG)
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise PlanError(
            f"{path} not found: model.path must be a local checkpoint directory "
            "(or plan with --model released for the released model's sizes)"
        )
    from higgs_lora.model.loading import check_model_dir  # reads config.json only: no torch

    # An original-layout (unconverted) checkpoint has other config keys: say how to convert it, not KeyError.
    return dict(check_model_dir(model_path).config)
