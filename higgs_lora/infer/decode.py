"""The decode loop: from a batch of cloning prompts to audio-code columns, one column per step.

`generate_columns` runs the model itself (prefill, then one audio frame per step with a KV cache) rather than
transformers' `generate`, for what `generate` does not offer: a column is handed out as soon as it exists (audio
streaming), each request has its own sampling settings and seed, and on a GPU the decode step runs with a static KV
cache under `torch.compile` (CUDA graphs), which needs fixed shapes that we control here.

Layout of a batch (the model's own conventions):
- text positions are left-padded (pad id, attention 0), positions ids count real tokens only, so a padded prompt
  sees exactly the positions it would see alone;
- the reference audio rows (`audio_input_ids`) are right-padded with a mask, as the model scatters them in order
  into the audio placeholders;
- every decode step feeds one (B, 1, K) audio frame: the model embeds it with the audio embeddings and runs every
  position through the audio feed-forward path (no text token is involved after the prompt).

Two KV caches: `dynamic` (transformers' DynamicCache, growing; the mask is the 2-D attention mask, exactly as
`generate` builds it, which is what the greedy-equality test compares against) and `static` (preallocated to prompt
+ max columns; the attention mask is a 4-D additive mask of fixed size, so a compiled decode step never recompiles).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from higgs_lora.data.collate import Prompt
from higgs_lora.infer.sampling import DelayConstraints, SamplingParams, choose_codes

DecodeStep = Callable[..., torch.Tensor]


@dataclass
class Column:
    """One decode step of a batch."""

    step: int
    codes: torch.Tensor
    """(B, K) the delay-pattern column chosen at this step (on the CPU)."""
    finished: torch.Tensor
    """(B,) bool: the stream has emitted EOS on every codebook at this step or earlier."""
    newly_finished: torch.Tensor
    """(B,) bool: it did so at this step."""


@dataclass(frozen=True)
class ModelSpec:
    """What the loop needs to know of the model (read from its config)."""

    num_codebooks: int
    codebook_size: int
    bos_id: int
    eos_id: int
    pad_token_id: int

    @classmethod
    def of(cls, config) -> ModelSpec:
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        return cls(
            config.num_codebooks, config.codebook_size, config.audio_stream_bos_id, config.audio_stream_eos_id, pad
        )


def batch_prompts(prompts: list[Prompt], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded text, right-padded reference audio, and position ids of a list of prompts."""
    length = max(len(p.input_ids) for p in prompts)
    num_audio = max(p.audio_input_ids.shape[0] for p in prompts)
    num_codebooks = prompts[0].audio_input_ids.shape[1]
    batch = len(prompts)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    audio = torch.zeros((batch, num_audio, num_codebooks), dtype=torch.long)
    audio_mask = torch.zeros((batch, num_audio), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n, a = len(prompt.input_ids), prompt.audio_input_ids.shape[0]
        input_ids[row, length - n :] = prompt.input_ids
        attention_mask[row, length - n :] = 1
        audio[row, :a] = prompt.audio_input_ids
        audio_mask[row, :a] = True
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "audio_input_ids": audio,
        "audio_input_ids_mask": audio_mask,
        "position_ids": position_ids,
    }
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def additive_mask(valid: torch.Tensor, query_length: int, start: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Q, S) additive attention mask: query q (at cache slot start + q) sees the valid slots up to itself."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    queries = start + torch.arange(query_length, device=valid.device)
    allowed = valid[:, None, None, :].bool() & (slots[None, None, None, :] <= queries[None, None, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class DecodeLoop:
    """Runs prefill and decode steps of one model, with a dynamic or a static (optionally compiled) KV cache."""

    def __init__(self, model, cache: str = "dynamic", compile_step: bool = False, inference_mode: bool = True):
        """`inference_mode=False` runs the model under `torch.no_grad` instead: for a model that keeps training
        afterwards (DeepSpeed ZeRO-3 gathers parameters inside the forward, and tensors made in inference mode must
        never reach autograd later)."""
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache={cache!r}: expected 'dynamic' or 'static'")
        if compile_step and cache != "static":
            raise ValueError("a compiled decode step needs the static cache (fixed shapes)")
        self.model, self.cache_kind = model, cache
        self._no_grad = torch.inference_mode if inference_mode else torch.no_grad
        self.spec = ModelSpec.of(model.config)
        self._step: DecodeStep = self._forward
        if compile_step:
            # mode="reduce-overhead" captures the decode step in a CUDA graph; the static cache keeps its shapes.
            self._step = torch.compile(self._forward, mode="reduce-overhead", fullgraph=False, dynamic=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def _forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs, use_cache=True, logits_to_keep=1, return_dict=True).logits[:, -1]

    def new_cache(self, max_length: int):
        """A fresh KV cache; a static one is preallocated to `max_length` positions."""
        from transformers import DynamicCache, StaticCache

        if self.cache_kind == "dynamic":
            return DynamicCache(config=self.model.config)
        return StaticCache(config=self.model.config, max_cache_len=max_length)

    def run(
        self,
        prompts: list[Prompt],
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        all_done: Callable[[bool], bool] | None = None,
    ) -> Iterator[Column]:
        """Yield one `Column` per decode step until every stream has finished or reached its max columns.

        `all_done(local)` makes several processes decode in lockstep (DeepSpeed ZeRO-3, where every forward pass is
        collective): called after each step with whether this batch is done, it returns whether every process's is
        (an all-reduce); a finished batch keeps stepping, its columns all EOS, until then. Every process must give
        the same max columns (`SamplingParams.max_seconds`), or the longest one waits for the others forever.
        """
        spec, device = self.spec, self.device
        batch = batch_prompts(prompts, spec.pad_token_id, device)
        size, prompt_length = batch["input_ids"].shape
        max_columns = max(p.max_columns() for p in params)
        limits = torch.tensor([p.max_columns() for p in params], device=device)
        cache = self.new_cache(prompt_length + max_columns)
        valid = torch.zeros((size, prompt_length + max_columns), dtype=torch.long, device=device)
        valid[:, :prompt_length] = batch["attention_mask"]
        constraints = DelayConstraints(size, spec.num_codebooks, spec.bos_id, spec.eos_id, device)
        finished = torch.zeros(size, dtype=torch.bool, device=device)
        history = torch.zeros((size, 0, spec.num_codebooks), dtype=torch.long, device=device)
        positions = batch["position_ids"][:, -1:]

        # Inference mode around the model calls only: a generator's `with` block would stay active in the
        # consumer's code between steps.
        prefill = {k: batch[k] for k in ("input_ids", "audio_input_ids", "audio_input_ids_mask", "position_ids")}
        prefill["attention_mask"] = self._mask(valid, prompt_length, 0, prompt_length)
        with self._no_grad():
            logits = self._forward(**prefill, cache=cache)
        for step in range(max_columns):
            logits = logits.float().reshape(size, spec.num_codebooks, spec.codebook_size)
            codes = choose_codes(logits, constraints, params, generators, history)
            # A finished stream keeps emitting EOS (its frames are ignored), as transformers does.
            codes = torch.where(finished[:, None], spec.eos_id, codes)
            done = constraints.advance(codes) | (step + 1 >= limits)
            newly = done & ~finished
            finished = finished | done
            history = torch.cat([history, codes[:, None]], dim=1)
            yield Column(step=step, codes=codes.cpu(), finished=finished.cpu(), newly_finished=newly.cpu())
            done_here = bool(finished.all())
            if all_done(done_here) if all_done is not None else done_here:
                return
            slot = prompt_length + step
            valid[:, slot] = 1
            positions = positions + 1
            inputs = {
                "audio_input_ids": codes[:, None, :],
                "position_ids": positions,
                "attention_mask": self._mask(valid, 1, slot, slot + 1),
            }
            with self._no_grad():
                logits = self._step(**inputs, cache=cache)

    def _mask(self, valid: torch.Tensor, query_length: int, start: int, end: int) -> torch.Tensor:
        """The attention mask for queries at cache slots [start, start + query_length): 2-D for the dynamic cache
        (transformers builds the causal mask from it), 4-D additive over the whole static cache otherwise."""
        if self.cache_kind == "dynamic":
            return valid[:, :end]
        return additive_mask(valid, query_length, start, self.dtype)


def stop_reason(columns: torch.Tensor, eos_id: int) -> str:
    """Why a finished stream of (L, K) columns ended: 'eos' (the model closed every codebook) or 'max_seconds'."""
    return "eos" if bool((columns[-1] == eos_id).all()) else "max_seconds"


def columns_to_codes(columns: torch.Tensor, bos_id: int, eos_id: int) -> tuple[torch.Tensor, int]:
    """(K, T) codec codes from (L, K) generated delay-pattern columns, and how many ids had to be repaired.

    T is the number of frames every codebook has a slot for: up to the first EOS of codebook 0, and no further
    than the columns generated (a stream cut at its length limit keeps its complete frames). A stray BOS or EOS
    inside the code region (a model is never trained to emit one there, but sampling may) cannot be decoded by the
    codec; it is replaced by the same codebook's previous code (0 at the very start) and counted.
    """
    length, num_codebooks = columns.shape
    first_eos = (columns[:, 0] == eos_id).nonzero()
    frames = length - num_codebooks
    if len(first_eos):
        frames = min(frames, int(first_eos[0, 0]) - 1)
    frames = max(frames, 0)
    codes = torch.stack([columns[k + 1 : k + 1 + frames, k] for k in range(num_codebooks)])
    invalid = codes >= min(bos_id, eos_id)
    repaired = int(invalid.sum())
    if repaired:
        codes = codes.clone()
        for k, t in invalid.nonzero().tolist():
            codes[k, t] = codes[k, t - 1] if t > 0 else 0
    return codes, repaired
