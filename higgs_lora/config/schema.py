"""Run configuration: one dataclass per concern, nested in `RunConfig`, with its defaults (once, here).

A run is described by a YAML file whose sections mirror these dataclasses, plus `key=value` overrides from the
command line (load.py reads both). The docstring under each field is its help text (help.py prints them:
`higgs-lora config --help-keys`). Building a `RunConfig` runs the cross-field checks of validate.py and raises
`ConfigError` listing every problem. Imports no torch; see docs/training.md ("Configuration").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from higgs_lora.config.validate import validate_run
from higgs_lora.constants import DEFAULT_SCENE, SAMPLE_RATE
from higgs_lora.errors import UserError

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
    diacritize: Literal["none", "auto"] = "none"
    """Arabic diacritisation of transcripts (prepare) and target texts (inference), applied identically: 'auto'
    adds tashkeel to every word that has none with text2tashkeel's bundled ONNX model (`pip install
    higgs-lora[arabic]`); words already diacritised are kept. Recorded with the adapter (docs/arabic.md)."""
    require_arabic_letters: bool = True
    """Reject transcripts with no Arabic letter when data.language is 'ar' (catches misrouted Latin transcripts)."""
    max_letters_per_second: float = 25.0
    """Reject a transcript with more letters (diacritics not counted) per second of audio than this: the text is
    implausibly long for its recording."""
    scene: str = DEFAULT_SCENE
    """Scene description in the system turn of every prompt (default: Boson AI's quiet-room scene, the prompt the
    released model knows); '' keeps the system turn without a scene; 'none' renders no system turn at all. Saved
    with the adapter: inference and the server prompt with it unless a request names its own."""
    eval_speakers: list[str] = field(default_factory=list)
    """Speakers held out of training for the evaluation loss. Empty: data.num_eval_speakers drawn with the seed."""
    num_eval_speakers: int = 1
    """Speakers held out when data.eval_speakers is empty (none when the corpus has fewer than 3 speakers)."""
    replay: str = ""
    """A second corpus (any format data.corpus takes, e.g. English speech the base speaks well) mixed into training
    against forgetting; `prepare` caches it in <cache_dir>/replay. Empty: no replay."""
    replay_format: Literal["auto", "manifest", "chatml", "ljspeech", "commonvoice", "hf"] = "auto"
    """Format of data.replay; 'auto' detects it from the path."""
    replay_language: str = "en"
    """Language code of data.replay (its records carry it; Arabic text rules apply only to 'ar')."""
    replay_fraction: float = 0.0
    """Share of every optimizer step's training targets drawn from data.replay (e.g. 0.1); 0: off."""

    def prompt_settings(self) -> dict[str, Any]:
        """What decides the tokens of a prompt besides its texts and audio: the scene and the text normalisation.
        Recorded with every adapter and merged model (their higgs_lora.yaml; listed in model cards and
        provenance) so inference prompts a model as it was trained (docs/inference.md#the-prompt)."""
        keys = ("scene", "language", "strip_diacritics", "fold_letters", "numbers_to_words", "diacritize")
        return {key: getattr(self, key) for key in keys}


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
    eval_asr: str = ""
    """Local speech-recognition checkpoint (transformers Whisper or CTC layout, never downloaded) that transcribes
    the evaluation clips on rank 0 for CER/WER (and picks <output_dir>/best/). Empty: no CER/WER."""
    max_nonfinite_steps: int = 5
    """A step whose loss is NaN/inf is skipped with a warning; this many in a row stop the run with an error."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one accelerator, for MFU. 0: a measured value for known GPUs, else no MFU."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers that get the logged metrics besides metrics.jsonl: any of tensorboard (<output_dir>/tensorboard),
    wandb, mlflow (optional extras: pip install 'higgs-lora[wandb]' / '[mlflow]'); [] for metrics.jsonl only."""
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
        problems = validate_run(self)
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)
