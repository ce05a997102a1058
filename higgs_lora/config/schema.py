"""Run configuration: one dataclass per concern, nested in `RunConfig`.

A run is described by a YAML file whose sections mirror the dataclasses below, plus `key=value` overrides from
the command line (`train.lr=2e-4 lora.r=32`). Defaults live here, once. Everything a user can get wrong is
reported together, each problem naming its key and what to do:

- unknown keys (with the closest valid key suggested),
- values of the wrong type (`train.max_steps=ten`),
- impossible combinations (`data.min_seconds` above `data.max_seconds`, flash attention in fp32, ...).

The docstring under each field is its help text: `python -m higgs_lora.config --help-keys` prints them all.
`python -m higgs_lora.config --config X.yaml [key=value ...]` prints the resolved config; `--save PATH` writes it,
and `load_config(PATH)` reads it back equal to what was saved. This module imports no torch: every entry point can
parse and validate its command line before paying for heavy imports.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from higgs_lora.errors import UserError
from higgs_lora.constants import DELAY_POSITIONS, FRAMES_PER_SECOND, HOP_SAMPLES, NUM_CODEBOOKS, SAMPLE_RATE
from higgs_lora.files import atomic_write_text

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(UserError, ValueError):
    """One or more configuration problems; `problems` lists each as 'key: what is wrong; what to do'."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        bullet_list = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration {noun}:\n{bullet_list}")


@dataclass
class ModelConfig:
    """The base model and how it is loaded."""

    path: str = ""
    """Local directory of the Higgs Audio v2 checkpoint (transformers layout; Boson's original layout is detected
    and must be converted first). Nothing is downloaded: the weights are yours to provide."""
    codec_path: str = ""
    """Local directory of the audio codec (HiggsAudioV2TokenizerModel). Empty: the codec the checkpoint's
    processor config points to, if that is a local directory, else `<path>/../codec`."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Dtype of the frozen base weights and of compute (fp32 is for CPU tests and debugging)."""
    quantization: Literal["none", "nf4"] = "none"
    """'nf4' loads the base in 4-bit NF4 with bitsandbytes (QLoRA); heads and embeddings stay unquantised."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel. flash_attention_2 needs the flash-attn package and bf16/fp16."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: less memory, about a third more compute. 'auto' lets the planner
    turn it on only when the run does not fit at a useful micro-batch without it; true/false pins it."""
    use_text_head: bool = False
    """Load the text LM head too (needed only for the optional text loss, train.text_loss_weight > 0)."""


@dataclass
class LoraConfig:
    """The low-rank adapter trained on top of the frozen base."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.1
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Module names to adapt. The defaults hit attention q/k/v/o and both the text MLP and the audio MLP
    (gate/up/down) in every layer."""


@dataclass
class DataConfig:
    """The corpus, its cache, and how training samples are drawn from it."""

    corpus: str = ""
    """Corpus location: a JSONL manifest, ChatML JSON, an LJSpeech or Common Voice directory, or a local
    Hugging Face dataset directory."""
    format: Literal["auto", "manifest", "chatml", "ljspeech", "commonvoice", "hf"] = "auto"
    """Corpus format; 'auto' detects it from the path."""
    cache_dir: str = ""
    """Where `prepare` writes the codec-token cache that training reads. Empty: <output_dir>/cache."""
    language: str = "ar"
    """Language code of the corpus; 'ar' turns on the Arabic text checks and normalisation."""
    sample_rate: int = SAMPLE_RATE
    """Sample rate the codec expects, in Hz. Audio of any other rate is resampled to this."""
    min_seconds: float = 0.5
    """Shortest utterance kept, in seconds."""
    max_seconds: float = 20.0
    """Longest utterance kept as a training target, in seconds."""
    reference_min_seconds: float = 1.0
    """Shortest reference (voice prompt) drawn for a target, in seconds."""
    reference_max_seconds: float = 10.0
    """Longest reference (voice prompt) drawn for a target, in seconds."""
    strip_diacritics: bool = False
    """Remove Arabic diacritics from training text (kept by default: they guide pronunciation)."""
    fold_letters: bool = False
    """Fold alef/hamza forms, alef maqsura and ta marbuta in training text (off by default: it loses information)."""
    numbers_to_words: bool = True
    """Spell digits out as Arabic words (the model reads words; digits are ambiguous in speech)."""
    require_arabic_letters: bool = True
    """Reject transcripts with no Arabic letter when data.language is 'ar' (catches misrouted Latin transcripts)."""
    max_letters_per_second: float = 25.0
    """Reject a transcript with more letters (diacritics not counted) per second of audio than this: the text is
    implausibly long for its recording."""
    scene: str = ""
    """Optional scene description added to the system prompt (e.g. 'Audio is recorded in a quiet room.')."""
    eval_speakers: list[str] = field(default_factory=list)
    """Speakers held out of training for the evaluation loss. Empty: data.num_eval_speakers drawn with the seed."""
    num_eval_speakers: int = 1
    """Speakers held out when data.eval_speakers is empty (none when the corpus has fewer than 3 speakers)."""


@dataclass
class AudioConfig:
    """How recordings are checked and conditioned before the codec sees them (in `prepare`)."""

    target_lufs: float = -20.0
    """Integrated loudness every utterance is normalised to, in LUFS (ITU-R BS.1770); 0 disables it."""
    trim_silence: bool = True
    """Trim leading and trailing silence."""
    trim_db: float = 40.0
    """Silence for trimming: frames quieter than the loudest frame minus this many dB."""
    trim_pad_seconds: float = 0.05
    """Silence kept before the first and after the last loud frame when trimming, in seconds."""
    silence_dbfs: float = -55.0
    """Reject an utterance whose RMS level is below this (dBFS): silent or nearly so."""
    max_clipped_fraction: float = 0.001
    """Reject an utterance with more than this fraction of samples at full scale (|x| >= 0.999)."""


@dataclass
class PrepareConfig:
    """How `python -m higgs_lora.prepare` runs: shards, workers, codec batching."""

    shard_size: int = 256
    """Utterances per cache shard: the unit of resumption (a killed run redoes at most one shard per process)."""
    num_workers: int = 2
    """Threads decoding, checking and conditioning audio while the codec encodes."""
    codec_batch_size: int = 16
    """Utterances per codec call. Only clips of the same frame count are batched, so batching never changes the
    codes (the codec's attention has no padding mask)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the codec runs; 'auto' uses a GPU when one is present."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    lr: float = 2e-4
    """Peak learning rate of the adapter parameters."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up, in optimizer steps."""
    max_steps: int = 1000
    """Optimizer steps to run; 0 means run train.epochs epochs instead."""
    epochs: int = 1
    """Passes over the corpus when train.max_steps is 0."""
    micro_batch_tokens: int = 0
    """Model positions per micro-batch on one GPU, padding included; 0 lets the planner choose."""
    global_batch_tokens: int = 0
    """Target model positions per optimizer step over all ranks; 0 lets the planner choose."""
    grad_clip: float = 1.0
    """Gradient norm clip; 0 disables it."""
    text_loss_weight: float = 0.0
    """Weight of the optional text loss (needs model.use_text_head); 0 trains audio only."""
    log_every: int = 10
    """Log loss, per-codebook losses, throughput and memory every N optimizer steps."""
    save_every: int = 200
    """Write a resumable checkpoint every N optimizer steps."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted once a newer one is complete."""
    eval_every: int = 200
    """Compute the loss on the held-out speakers every N optimizer steps (and at the end); 0 disables it."""
    eval_samples: int = 4
    """Held-out pairs generated at every evaluation (the same pairs and seeds each time): their speaker similarity
    and DNSMOS go to TensorBoard and metrics.jsonl, the clips to <output_dir>/eval_samples/step_N/. 0: loss only."""
    eval_sample_seconds: float = 6.0
    """Longest clip the evaluation generates; targets up to this long are chosen first."""
    eval_dnsmos: bool = True
    """Score the evaluation clips with DNSMOS too (a second or so per clip on the CPU of rank 0)."""
    max_nonfinite_steps: int = 5
    """A step whose loss is NaN/inf is skipped with a warning; this many in a row stop the run with an error."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one accelerator, for MFU. 0: a measured value for known GPUs, else no MFU."""
    tensorboard: bool = True
    """Write the logged metrics to <output_dir>/tensorboard as well."""
    resume: str = "auto"
    """'auto' resumes from the newest complete checkpoint in output_dir if there is one, 'never' starts afresh,
    anything else is a checkpoint directory to resume from."""


@dataclass
class PlanConfig:
    """Hardware and memory planning (the planner fills what is left at 0 / 'auto')."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 2 or 3 pins it; 0 lets the planner choose."""
    offload: Literal["auto", "none", "optimizer", "optimizer+params"] = "auto"
    """What ZeRO offloads to host memory; 'auto' lets the planner decide."""
    gpus_per_node: int = 0
    """GPUs per node; 0 detects them."""
    gpu_memory_gib: float = 0.0
    """Memory per GPU in GiB; 0 detects it."""
    nodes: int = 0
    """Number of nodes; 0 detects it from the launcher or SLURM."""
    memory_margin: float = 0.1
    """Fraction of GPU memory the plan leaves free for fragmentation and the unexpected."""
    useful_micro_batch_tokens: int = 2048
    """Positions per micro-batch at which a GPU is well used (a 3B model's matmuls are large from ~2k rows; the
    planner raises it to two of the longest samples): a way of running is taken only if it reaches this budget
    (else the next, slower one: checkpointing, ZeRO-3, offload), and the slower ways are not planned past it.
    Checkpointing costs a third more compute, more than a smaller micro-batch does past this size."""
    max_micro_batch_tokens: int = 32768
    """Upper bound of a planned budget (ZeRO-2 without checkpointing on a large GPU)."""


@dataclass
class RunConfig:
    """A whole run: what to train, on what, how, and where results go."""

    name: str = "higgs-lora"
    """Run name; written into adapter metadata and logs."""
    output_dir: str = "runs/default"
    """Directory for checkpoints, logs, the resolved config and reports."""
    seed: int = 1234
    """Seed for weights init of the adapter, data order and reference draws."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus and sampling."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    """Audio conditioning and checks."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """The cache-building run."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """Hardware planning."""

    def __post_init__(self) -> None:
        problems = _validate_run(self)
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)


# --------------------------------------------------------------------------------------------- validation


def max_sample_audio_positions(data: DataConfig) -> int:
    """Model positions taken by the audio of the longest possible sample: target plus reference, delay included.

    A lower bound on one sample's length (the prompt text comes on top), in positions.
    """
    target = round(data.max_seconds * FRAMES_PER_SECOND) + DELAY_POSITIONS
    reference = round(data.reference_max_seconds * FRAMES_PER_SECOND) + DELAY_POSITIONS
    return target + reference


def _validate_run(cfg: RunConfig) -> list[str]:
    """Cross-field checks; returns every problem found (empty when the config is consistent)."""
    problems: list[str] = []
    data, model, lora, train, plan = cfg.data, cfg.model, cfg.lora, cfg.train, cfg.plan

    def positive(key: str, value: float) -> None:
        if value <= 0:
            problems.append(f"{key}={value} must be > 0")

    def non_negative(key: str, value: float) -> None:
        if value < 0:
            problems.append(f"{key}={value} must be >= 0")

    positive("lora.r", lora.r)
    positive("lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        problems.append(f"lora.dropout={lora.dropout} must be in [0, 1)")
    if not lora.target_modules:
        problems.append("lora.target_modules is empty; list module names such as q_proj,v_proj")
    positive("train.lr", train.lr)
    for key in ("weight_decay", "warmup_steps", "max_steps", "epochs", "micro_batch_tokens",
                "global_batch_tokens", "grad_clip", "text_loss_weight"):
        non_negative(f"train.{key}", getattr(train, key))
    non_negative("train.eval_every", train.eval_every)
    non_negative("train.eval_samples", train.eval_samples)
    positive("train.eval_sample_seconds", train.eval_sample_seconds)
    non_negative("train.peak_tflops", train.peak_tflops)
    non_negative("data.num_eval_speakers", data.num_eval_speakers)
    for key in ("log_every", "save_every", "keep_last", "max_nonfinite_steps"):
        positive(f"train.{key}", getattr(train, key))
    if train.max_steps == 0 and train.epochs == 0:
        problems.append("train.max_steps=0 and train.epochs=0: nothing to train; set one of them")
    if train.text_loss_weight > 0 and not model.use_text_head:
        problems.append(
            f"train.text_loss_weight={train.text_loss_weight} needs the text head; set model.use_text_head=true "
            "or train.text_loss_weight=0"
        )
    if model.attn_implementation == "flash_attention_2" and model.dtype == "fp32":
        problems.append("model.attn_implementation=flash_attention_2 needs model.dtype=bf16 or fp16; or use sdpa")

    if data.max_letters_per_second <= 0:
        problems.append(f"data.max_letters_per_second={data.max_letters_per_second} must be > 0")
    for key in ("shard_size", "num_workers", "codec_batch_size"):
        positive(f"prepare.{key}", getattr(cfg.prepare, key))
    if not 0 <= cfg.audio.max_clipped_fraction <= 1:
        problems.append(f"audio.max_clipped_fraction={cfg.audio.max_clipped_fraction} must be in [0, 1]")
    if cfg.audio.target_lufs > 0:
        problems.append(f"audio.target_lufs={cfg.audio.target_lufs} must be <= 0 (e.g. -20), or 0 to disable")
    positive("data.sample_rate", data.sample_rate)
    positive("data.min_seconds", data.min_seconds)
    positive("data.reference_min_seconds", data.reference_min_seconds)
    if data.min_seconds >= data.max_seconds:
        problems.append(
            f"data.min_seconds={data.min_seconds} is not below data.max_seconds={data.max_seconds}; lower one or raise the other"
        )
    if data.reference_min_seconds >= data.reference_max_seconds:
        problems.append(
            f"data.reference_min_seconds={data.reference_min_seconds} is not below "
            f"data.reference_max_seconds={data.reference_max_seconds}; lower one or raise the other"
        )
    if train.micro_batch_tokens:
        longest = max_sample_audio_positions(data)
        if train.micro_batch_tokens < longest:
            problems.append(
                f"train.micro_batch_tokens={train.micro_batch_tokens} is smaller than one sample's audio alone "
                f"({longest:,} positions for data.max_seconds={data.max_seconds} plus "
                f"data.reference_max_seconds={data.reference_max_seconds}); raise it, lower those, or set 0 to plan it"
            )
    if train.global_batch_tokens and train.micro_batch_tokens and train.global_batch_tokens < train.micro_batch_tokens:
        problems.append(
            f"train.global_batch_tokens={train.global_batch_tokens} is below train.micro_batch_tokens="
            f"{train.micro_batch_tokens}; raise it or set 0 to plan it"
        )
    if plan.zero_stage not in (0, 2, 3):
        problems.append(f"plan.zero_stage={plan.zero_stage} must be 2, 3, or 0 (planned)")
    for key in ("gpus_per_node", "gpu_memory_gib", "nodes"):
        non_negative(f"plan.{key}", getattr(plan, key))
    positive("plan.useful_micro_batch_tokens", plan.useful_micro_batch_tokens)
    if plan.max_micro_batch_tokens < plan.useful_micro_batch_tokens:
        problems.append(f"plan.max_micro_batch_tokens={plan.max_micro_batch_tokens} is below "
                        f"plan.useful_micro_batch_tokens={plan.useful_micro_batch_tokens}")
    if not 0 <= plan.memory_margin < 0.9:
        problems.append(f"plan.memory_margin={plan.memory_margin} must be in [0, 0.9)")
    if model.quantization == "nf4" and plan.offload == "optimizer+params":
        problems.append(
            "model.quantization=nf4 with plan.offload=optimizer+params: 4-bit weights cannot be offloaded by ZeRO; "
            "use plan.offload=optimizer or auto"
        )
    return problems


# ------------------------------------------------------------------------------------ building from dicts


class _Raw(str):
    """A value typed on the command line, kept as text until its field's type is known.

    Typed values are parsed as YAML (so `lora.target_modules=[q_proj,v_proj]` is a list), except for string
    fields, which take the text as typed (so `train.resume=no` stays the string 'no', not YAML's False).
    """


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` to the field type `tp`, or raise ValueError with a message naming `key`."""
    origin = typing.get_origin(tp)
    wanted = _type_name(tp)
    if isinstance(value, _Raw) and tp is not str:
        try:
            value = yaml.safe_load(str(value)) if str(value) != "" else ""
        except yaml.YAMLError as err:
            raise ValueError(f"{key}: cannot parse {str(value)!r} ({err.__class__.__name__}); expected {wanted}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ValueError:
                continue  # try the next member of the union; the error below names them all
        raise ValueError(f"{key}={value!r} is not {wanted}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"{key}={value!r} is not one of {', '.join(repr(c) for c in choices)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # `a,b,c` on the command line
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r} is not a list; write [a, b] in YAML or a,b on the command line")
        return [_coerce(f"{key}[{i}]", item, inner) for i, item in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}={value!r} is not a bool; use true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}={value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}={value!r} is not a number")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}={value!r} is not a string; quote it in YAML")
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # a programming error in this module


def _build(cls: type, values: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, collecting unknown keys and type errors into `problems`."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.append(f"{prefix or 'the config'} must be a mapping of keys to values, not {type(values).__name__}")
        values = {}
    hints = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full_key = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys here: {', '.join(known)}"
            problems.append(f"unknown key {full_key}{hint}")
            continue
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, values[key], f"{full_key}.", problems)
            continue
        try:
            kwargs[key] = _coerce(full_key, value, tp)
        except ValueError as err:
            problems.append(str(err))
    if cls is RunConfig and problems:
        # Key and type errors are reported first: the cross-field checks in RunConfig need well-typed values.
        raise ConfigError(problems)
    return cls(**kwargs)


def _set_override(tree: dict[str, Any], override: str, problems: list[str]) -> None:
    """Apply one `a.b.c=value` override to the nested dict `tree`."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        problems.append(f"override {override!r} is not key=value (e.g. train.lr=2e-4)")
        return
    cls: type = RunConfig
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(parts[:depth])
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            where = f"{prefix}." if prefix else ""
            hint = f"; did you mean {where}{close[0]}?" if close else f"; valid keys here: {', '.join(names)}"
            problems.append(f"unknown key {key} in override {override!r}{hint}")
            return
        tp = _field_types(cls)[part]
        last = depth == len(parts) - 1
        if _is_dataclass_type(tp):
            if last:
                problems.append(f"override {override!r} names a section; set one of its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
                return
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, cls = child, tp
        elif not last:
            problems.append(f"override {override!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            return
        else:
            node[part] = _Raw(text)


def build_config(base: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a validated RunConfig from a (YAML-shaped) dict and `key=value` overrides.

    Raises ConfigError listing every problem: unknown keys, wrong types, impossible combinations.
    """
    tree = _deep_copy(base or {})
    problems: list[str] = []
    if not isinstance(tree, dict):
        raise ConfigError([f"the config must be a mapping of sections, not {type(tree).__name__}"])
    for override in overrides:
        _set_override(tree, override, problems)
    return _build(RunConfig, tree, "", problems)


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file is an empty dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError([f"{path} is not valid YAML: {err}"]) from None
    return tree or {}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML run config (or only defaults when `path` is None) and apply overrides."""
    return build_config(load_yaml(path) if path else {}, overrides)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically. `load_config(path)` gives back an equal config."""
    return atomic_write_text(path, cfg.to_yaml())


# ------------------------------------------------------------------------------------------------- help


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (its help text), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every settable key as (key, type, default, help), in declaration order."""
    rows = []
    hints = _field_types(cls)
    defaults = cls() if cls is not RunConfig else None
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe_keys(tp, f"{prefix}{f.name}."))
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", _type_name(tp), default, docs.get(f.name, "")))
    return rows


def format_help() -> str:
    lines = ["Run configuration keys (set in YAML sections or as key=value overrides):", ""]
    for key, type_name, default, doc in describe_keys():
        lines.append(f"  {key} ({type_name}, default {default!r})")
        for wrapped in textwrap.wrap(doc, 100):
            lines.append(f"      {wrapped}")
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The small, stable command line every entry point shares: --config, --help-keys and overrides."""
    parser.add_argument("--config", help="run config YAML (see configs/)")
    parser.add_argument("--help-keys", action="store_true", help="list every config key with its type, default and help")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.lr=2e-4")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Resolve the config from parsed `add_config_arguments` args; prints help and exits for --help-keys."""
    if args.help_keys:
        print(format_help())
        raise SystemExit(0)
    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m higgs_lora.config",
        description="Resolve and print a run config (YAML + key=value overrides), or list every key.",
    )
    add_config_arguments(parser)
    parser.add_argument("--save", help="also write the resolved config to this YAML file")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    if args.save:
        save_config(cfg, args.save)
        print(f"# saved to {args.save}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
