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

Shape buckets (`bucket=True`, the default of a compiled step): the static cache is sized to the smallest bucket
(`cache_bucket`: a power of two, at least 256 slots) holding prompt + max columns, and the batch is padded with dummy
rows to `batch_bucket` (a power of two, capped at the loop's `max_batch`). The slots after a request's own are never
valid in its mask, the dummy rows copy a real prompt, decode greedily and start finished, and only the real rows are
handed out, so a request's columns do not depend on its bucket; a server compiles each (batch, cache) bucket once,
and `warm_up` compiles them all before the first request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from higgs_lora.data.collate import Prompt
from higgs_lora.infer.sampling import DelayConstraints, SamplingParams, choose_codes

DecodeStep = Callable[..., torch.Tensor]

SMALLEST_CACHE_BUCKET = 256
"""Slots of the smallest static-cache bucket; the others double it."""
MAX_CACHE_SLOTS = 32768
"""The largest bucket dynamo is told to keep a compiled graph for (a 600 s stream is 15,009 columns)."""


def cache_bucket(length: int, smallest: int = SMALLEST_CACHE_BUCKET) -> int:
    """The static-cache size (slots) a decode of `length` positions (prompt + max columns) runs in."""
    return max(smallest, 1 << max(length - 1, 0).bit_length())


def batch_bucket(size: int, max_batch: int) -> int:
    """The batch size `size` requests are padded to: the next power of two, at most `max_batch` (and >= size)."""
    return max(size, min(1 << max(size - 1, 0).bit_length(), max_batch))


def batch_buckets(max_batch: int) -> list[int]:
    """Every batch bucket a loop with `max_batch` can use: 1, 2, 4, ... and `max_batch` itself."""
    return sorted({batch_bucket(size, max_batch) for size in range(1, max_batch + 1)})


def cache_buckets(max_length: int, smallest: int = SMALLEST_CACHE_BUCKET) -> list[int]:
    """Every cache bucket up to the one holding `max_length` positions."""
    sizes, size = [], smallest
    while True:
        sizes.append(size)
        if size >= max_length:
            return sizes
        size *= 2


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

    def __init__(
        self,
        model,
        cache: str = "dynamic",
        compile_step: bool = False,
        inference_mode: bool = True,
        bucket: bool | None = None,
        max_batch: int = 8,
        compile_backend: str | Callable = "inductor",
    ):
        """`inference_mode=False` runs the model under `torch.no_grad` instead: for a model that keeps training
        afterwards (DeepSpeed ZeRO-3 gathers parameters inside the forward, and tensors made in inference mode must
        never reach autograd later). `bucket` (static cache only; default: when the step is compiled) rounds the
        cache and batch sizes up to their buckets; `max_batch` caps the batch buckets. `compile_backend` is
        `torch.compile`'s backend (a test passes a counting one)."""
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache={cache!r}: expected 'dynamic' or 'static'")
        if compile_step and cache != "static":
            raise ValueError("a compiled decode step needs the static cache (fixed shapes)")
        bucket = compile_step if bucket is None else bucket
        if bucket and cache != "static":
            raise ValueError("shape buckets need the static cache")
        self.model, self.cache_kind, self.bucket, self.max_batch = model, cache, bucket, max_batch
        self._no_grad = torch.inference_mode if inference_mode else torch.no_grad
        self.spec = ModelSpec.of(model.config)
        self._step: DecodeStep = self._forward
        if compile_step:
            # mode="reduce-overhead" captures the decode step in a CUDA graph; the static cache keeps its shapes.
            # One compiled graph per (batch, cache) bucket: let dynamo keep all of them (its default keeps 8).
            limit = len(batch_buckets(max_batch)) * len(cache_buckets(MAX_CACHE_SLOTS))
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 4 * limit
            )
            # CUDA graphs exist only on a GPU: elsewhere the default mode.
            mode = "reduce-overhead" if compile_backend == "inductor" and self.device.type == "cuda" else None
            self._step = torch.compile(
                self._forward, backend=compile_backend, mode=mode, fullgraph=False, dynamic=False
            )

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
        real = len(prompts)
        max_columns = max(p.max_columns() for p in params)
        if self.bucket:  # dummy rows up to the batch bucket: greedy (no random draws), finished from the start
            extra = batch_bucket(real, max(self.max_batch, real)) - real
            prompts = list(prompts) + [prompts[-1]] * extra
            params = list(params) + [SamplingParams(temperature=0, max_seconds=params[-1].max_seconds)] * extra
            generators = list(generators) + [None] * extra
        batch = batch_prompts(prompts, spec.pad_token_id, device)
        size, prompt_length = batch["input_ids"].shape
        limits = torch.tensor([p.max_columns() for p in params], device=device)
        slots = prompt_length + max_columns
        slots = cache_bucket(slots) if self.bucket else slots
        cache = self.new_cache(slots)
        valid = torch.zeros((size, slots), dtype=torch.long, device=device)
        valid[:, :prompt_length] = batch["attention_mask"]
        constraints = DelayConstraints(size, spec.num_codebooks, spec.bos_id, spec.eos_id, device)
        finished = torch.arange(size, device=device) >= real
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
            yield Column(
                step=step, codes=codes[:real].cpu(), finished=finished[:real].cpu(), newly_finished=newly[:real].cpu()
            )
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

    def warm_up(self, prompt: Prompt, max_length: int) -> list[tuple[int, int]]:
        """Compile the decode step for every (batch, cache) bucket up to `max_length` positions, with `prompt` as
        every row (a prefill and one decode step each); returns the buckets warmed, as (batch, slots)."""
        if not self.bucket:
            raise ValueError("warm_up needs shape buckets (a static cache with bucket=True)")
        spec, device, warmed = self.spec, self.device, []
        for size in batch_buckets(self.max_batch):
            batch = batch_prompts([prompt] * size, spec.pad_token_id, device)
            prompt_length = batch["input_ids"].shape[1]
            for slots in cache_buckets(max_length):
                if slots <= prompt_length:
                    continue
                cache = self.new_cache(slots)
                valid = torch.zeros((size, slots), dtype=torch.long, device=device)
                valid[:, :prompt_length] = batch["attention_mask"]
                prefill = {
                    k: batch[k] for k in ("input_ids", "audio_input_ids", "audio_input_ids_mask", "position_ids")
                }
                prefill["attention_mask"] = self._mask(valid, prompt_length, 0, prompt_length)
                valid[:, prompt_length] = 1
                inputs = {
                    "audio_input_ids": torch.full((size, 1, spec.num_codebooks), spec.bos_id, device=device),
                    "position_ids": batch["position_ids"][:, -1:] + 1,
                    "attention_mask": self._mask(valid, 1, prompt_length, prompt_length + 1),
                }
                with self._no_grad():
                    self._forward(**prefill, cache=cache)
                    self._step(**inputs, cache=cache)
                warmed.append((size, slots))
        return warmed

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
