"""The one inference core: zero-shot Arabic voice cloning with a merged model or a base plus LoRA adapters.

    cloner = VoiceCloner.load("merged/")              # or VoiceCloner.load(base, adapters={"ar": "run/adapter"})
    result = cloner.clone("ref.wav", "نص التسجيل المرجعي", "النص الجديد الذي يقال بصوت المتحدث")
    soundfile.write("out.wav", result.waveform, result.sample_rate)

The batch CLI (`higgs_lora.infer.batch`), the REST API and the WebSocket stream (`higgs_lora.serve.app`) are thin
layers over `VoiceCloner.events`, which runs a batch of requests (`infer.requests`) and yields audio as it is made:

1. the reference recording is conditioned as training conditioned its corpus (mono 24 kHz, silence trimmed,
   loudness normalised) and encoded by the codec once (cached by content, so a voice used again costs nothing;
   `infer.reference`);
2. texts are normalised as the training run normalised its transcripts (the run config saved with the adapter or
   merged model says how); a long target text is cut at sentence ends (`arabic.split_sentences`) and its pieces are
   spoken one after another, each prompted with the same reference, so the voice stays the same;
3. each piece's prompt is the training sample's layout cut where the target audio begins (`collate.build_prompt`),
   with the last `SamplingParams.context_pieces` pieces already spoken (text and codes) between the reference and
   its text (`collate.build_long_form_prompt`), so one long text is one continuous voice;
4. `generation.Decoder` produces delay-pattern columns; they are reverted into codec frames and decoded, either all
   at once when the piece ends, or in chunks as frames arrive (`infer.streaming_codec.StreamingCodec`).

Adapters are loaded once on top of the base; each batch runs with the adapter its requests name (None: the base).
See docs/inference.md.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from higgs_lora.config import ModelConfig, RunConfig, load_config
from higgs_lora.constants import FRAMES_PER_SECOND, RUN_CONFIG, SAMPLE_RATE
from higgs_lora.data.collate import (
    Prompt,
    SpokenPiece,
    build_long_form_prompt,
    build_prompt,
    context_that_fits,
    spoken_piece,
)
from higgs_lora.infer.decode import DecodeLoop, columns_to_codes, stop_reason
from higgs_lora.infer.reference import Reference, ReferenceCache, normalize_text
from higgs_lora.infer.requests import Chunk, CloneRequest, CloneResult, InferenceError
from higgs_lora.infer.sampling import SamplingParams, make_generator
from higgs_lora.infer.streaming_codec import StreamingCodec, StreamSettings, decode_codes
from higgs_lora.text.arabic import split_sentences

PAUSE_SECONDS = 0.15
"""Silence put between the pieces of a long text."""
MIN_PIECE_SECONDS = 0.2
"""A piece is not started with less than this left of its request's audio budget (it is skipped, stop 'budget')."""


@dataclass
class _Job:
    """The running state of one request inside `events`."""

    request: CloneRequest
    pieces: list[str]
    seed: int
    reference: Reference
    started: float
    piece: int = 0
    audio: list[np.ndarray] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    frames: int = 0
    repaired: int = 0
    first_audio: float | None = None
    spoken: list[SpokenPiece] = field(default_factory=list)
    """The last `context_pieces` pieces spoken, oldest first: the context of the next piece."""
    context_used: list[int] = field(default_factory=list)
    """Per piece: how many earlier pieces its prompt held."""
    prompt_positions: list[int] = field(default_factory=list)
    """Per piece: positions of its prompt."""

    @property
    def done(self) -> bool:
        return self.piece >= len(self.pieces)

    def budget_left(self) -> float | None:
        """Seconds of the request's audio budget (`SamplingParams.max_total_seconds`) not spent yet; None: none."""
        total = self.request.params.max_total_seconds
        return None if total is None else total - self.frames / FRAMES_PER_SECOND

    def piece_params(self) -> SamplingParams:
        """The request's settings for its current piece: `max_seconds` cut to what is left of its budget."""
        left = self.budget_left()
        params = self.request.params
        return params if left is None or left >= params.max_seconds else replace(params, max_seconds=left)


class VoiceCloner:
    """A loaded model (with its adapters), processor and codec, ready to clone voices."""

    def __init__(
        self,
        model,
        processor,
        codec,
        run_config: RunConfig,
        adapters: list[str],
        max_batch: int = 8,
        cache: str = "dynamic",
        compile_step: bool = False,
        stream: StreamSettings = StreamSettings(),
    ):
        self.model, self.processor, self.codec = model, processor, codec
        self.run_config, self.adapters, self.max_batch = run_config, adapters, max_batch
        self.decoder = DecodeLoop(model, cache=cache, compile_step=compile_step, max_batch=max_batch)
        self.stream_settings = stream
        self.references = ReferenceCache(codec, run_config)
        self.scenes: dict[str | None, str] = {}
        """Per adapter name: the scene recorded with it (its higgs_lora.yaml); others use `run_config.data.scene`."""

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        adapters: dict[str, str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        codec_path: str = "",
        cache: str = "auto",
        compile_step: bool | str = "auto",
        max_batch: int = 8,
    ) -> VoiceCloner:
        """Load a merged model or a base (transformers layout), and any adapters given as {name: directory}.

        `model_dir` may also be an adapter directory written by training: its base is then read from the adapter's
        run config. On a GPU the defaults are bf16, a static KV cache and a compiled decode step; on the CPU fp32
        and a dynamic cache.
        """
        from higgs_lora.model.loading import (
            check_model_dir,
            load_base_model,
            load_codec,
            load_processor,
            resolve_codec_path,
        )

        model_dir = Path(model_dir).expanduser()
        adapters = dict(adapters or {})
        if (model_dir / "adapter_config.json").is_file():
            adapters = {model_dir.name if model_dir.name != "adapter" else "adapter": str(model_dir), **adapters}
            model_dir = Path(load_config(model_dir / RUN_CONFIG).model.path)
        check_model_dir(model_dir)  # the layout first: an original checkpoint gets the convert command, not a traceback
        run_config = _run_config_for(model_dir, adapters)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        on_gpu = str(device).startswith("cuda")
        dtype = ("bf16" if on_gpu else "fp32") if dtype == "auto" else dtype
        model_cfg = ModelConfig(path=str(model_dir), codec_path=codec_path, dtype=dtype)
        model = load_base_model(model_cfg, device=device).eval()
        if adapters:
            model = _attach_adapters(model, adapters)
        codec = load_codec(resolve_codec_path(model_cfg), device=device)
        processor = load_processor(model_cfg, codec)
        cache = ("static" if on_gpu else "dynamic") if cache == "auto" else cache
        compile_step = (on_gpu and cache == "static") if compile_step == "auto" else bool(compile_step)
        cloner = cls(
            model,
            processor,
            codec,
            run_config,
            list(adapters),
            max_batch=max_batch,
            cache=cache,
            compile_step=compile_step,
        )
        for name, path in adapters.items():
            if (Path(path) / RUN_CONFIG).is_file():
                cloner.scenes[name] = load_config(Path(path) / RUN_CONFIG).data.scene
        return cloner

    # --------------------------------------------------------------------------------------------- requests

    def clone(
        self,
        reference_audio: str | Path | np.ndarray,
        reference_text: str,
        target_text: str,
        params: SamplingParams | None = None,
        adapter: str | None = None,
        reference_rate: int = SAMPLE_RATE,
    ) -> CloneResult:
        """Speak `target_text` in the voice of `reference_audio` (a path, or samples at `reference_rate` Hz)."""
        request = self.request(reference_audio, reference_text, target_text, params, adapter, reference_rate)
        return self.clone_batch([request])[0]

    def request(
        self,
        reference_audio: str | Path | np.ndarray,
        reference_text: str,
        target_text: str,
        params: SamplingParams | None = None,
        adapter: str | None = None,
        reference_rate: int = SAMPLE_RATE,
        scene: str | None = None,
    ) -> CloneRequest:
        """A `CloneRequest` from a path or samples (read here, so a bad file fails before any batch starts)."""
        if not isinstance(reference_audio, np.ndarray):
            from higgs_lora.data.audio import AudioError, read_audio

            try:
                reference_audio, reference_rate = read_audio(str(reference_audio))
            except AudioError as err:
                raise InferenceError(f"reference audio: {err}") from None
        return CloneRequest(
            reference_audio, reference_rate, reference_text, target_text, params or SamplingParams(), adapter, scene
        )

    def clone_batch(self, requests: list[CloneRequest]) -> list[CloneResult]:
        """Results of `requests` in order; batched `max_batch` at a time, grouped by adapter."""
        results: list[CloneResult | None] = [None] * len(requests)
        for group in self.batches(range(len(requests)), [r.adapter for r in requests]):
            for chunk in self.events([requests[i] for i in group], stream=False):
                if chunk.result is not None:
                    results[group[chunk.index]] = chunk.result
        return results  # type: ignore[return-value]

    def batches(self, indices, adapters: list[str | None]) -> list[list[int]]:
        """Indices grouped by adapter, each group cut to `max_batch`."""
        by_adapter: dict[str | None, list[int]] = {}
        for i in indices:
            by_adapter.setdefault(adapters[i], []).append(i)
        return [
            group[s : s + self.max_batch] for group in by_adapter.values() for s in range(0, len(group), self.max_batch)
        ]

    def check(self, request: CloneRequest) -> None:
        """Raise InferenceError naming everything wrong with `request` (before it takes a batch slot)."""
        problems = request.params.problems()
        if not request.target_text.strip():
            problems.append("target text is empty")
        if not request.reference_text.strip():
            problems.append("reference text is empty: give the transcript of the reference recording")
        if request.adapter is not None and request.adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none loaded"
            problems.append(f"unknown adapter {request.adapter!r} (loaded: {known})")
        if problems:
            raise InferenceError("; ".join(problems))

    def prepare(self, request: CloneRequest) -> None:
        """Check `request` and encode its reference now (cached), so that nothing about it can fail in a batch."""
        self.check(request)
        self.reference(request.reference_audio, request.reference_rate, request.reference_text)
        if not split_sentences(self.normalize(request.target_text)):
            raise InferenceError("target text is empty after normalisation")

    # ------------------------------------------------------------------------------------------ generation

    def events(self, requests: list[CloneRequest], stream: bool = True) -> Iterator[Chunk]:
        """Run `requests` (one adapter) as one batch; yield their audio chunk by chunk, then one final `Chunk`
        per request with its `CloneResult`.

        Long texts are spoken piece by piece: each round (`step`) generates the next piece of every request that has
        one left, so a batch of requests with several pieces stays batched; each piece's prompt holds the pieces of
        its own request spoken before it (`_Job.spoken`, docs/inference.md#long-texts), so a request's rounds depend
        on nothing but its own earlier rounds. With `stream=False` a piece is decoded once it is complete (exactly
        the non-streamed waveform); with `stream=True` it is decoded in chunks as frames arrive.
        """
        if len({r.adapter for r in requests}) > 1:
            raise InferenceError("one batch runs one adapter: group requests by adapter (VoiceCloner.batches)")
        started = time.perf_counter()
        jobs = [self.start(r, started) for r in requests]
        while active := [i for i, job in enumerate(jobs) if not job.done]:
            for chunk in self.step([jobs[i] for i in active], stream):
                yield Chunk(active[chunk.index], chunk.samples, chunk.result)

    def start(self, request: CloneRequest, started: float | None = None) -> _Job:
        """The running state of `request` (checked, its text cut into pieces, its reference encoded), for `step`."""
        self.check(request)
        return self._job(request, time.perf_counter() if started is None else started)

    def step(self, jobs: list[_Job], stream: bool = True) -> Iterator[Chunk]:
        """Speak the next piece of each of `jobs` (one adapter, none done) as one batch: yield their audio
        (`Chunk.index` is the position in `jobs`), then a final `Chunk` with the result of each job this finished.

        Jobs may be regrouped between steps (a server interleaves the pieces of several requests this way): a job's
        pieces depend only on its own earlier pieces and its seed.
        """
        if len({job.request.adapter for job in jobs}) > 1:
            raise InferenceError("one batch runs one adapter: group requests by adapter (VoiceCloner.batches)")
        with self._adapter(jobs[0].request.adapter if jobs else None):
            yield from self._round(jobs, list(range(len(jobs))), stream)
        for i, job in enumerate(jobs):
            job.piece += 1
            if job.piece < len(job.pieces) and job.budget_left() is not None and job.budget_left() < MIN_PIECE_SECONDS:
                job.stops.extend(["budget"] * (len(job.pieces) - job.piece))
                job.piece = len(job.pieces)
            if job.done:
                yield Chunk(i, np.zeros(0, dtype=np.float32), result=self._result(job))

    def _round(self, jobs: list[_Job], active: list[int], stream: bool) -> Iterator[Chunk]:
        """Generate the current piece of each active job; yield its audio (chunks or whole)."""
        spec = self.decoder.spec
        prompts, params, generators = [], [], []
        for i in active:
            job = jobs[i]
            prompts.append(self._prompt(job))
            params.append(job.piece_params())
            generators.append(
                make_generator(job.seed + job.piece, self.decoder.device)
                if job.request.params.temperature > 0
                else None
            )
        for i in active:
            # The pause before a piece goes out before any of its audio: streamed chunks of a piece leave while it is
            # generated, so a pause sent when the piece ends would land inside it.
            if jobs[i].piece > 0:
                yield self._audio(jobs[i], i, np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), dtype=np.float32))
        columns: list[list[torch.Tensor]] = [[] for _ in active]
        decoders = [StreamingCodec(self.codec, self.stream_settings) for _ in active]
        done = [False] * len(active)
        for column in self.decoder.run(prompts, params, generators):
            for row, i in enumerate(active):
                if done[row]:
                    continue
                columns[row].append(column.codes[row])
                if column.finished[row]:
                    done[row] = True
                    yield from self._end_piece(jobs[i], i, torch.stack(columns[row]), decoders[row], stream, spec)
                elif stream:
                    codes, _ = columns_to_codes(torch.stack(columns[row]), spec.bos_id, spec.eos_id)
                    for samples in decoders[row].push(codes):
                        yield self._audio(jobs[i], i, samples)

    def _prompt(self, job: _Job) -> Prompt:
        """The prompt of `job`'s current piece: reference, the earlier pieces that fit the request's context
        settings (oldest dropped first), then the piece's text; what it holds is recorded on `job`."""
        prompt = build_prompt(
            self.processor, job.reference.text, job.reference.codes, job.pieces[job.piece], self.scene(job.request)
        )
        params = job.request.params
        sizes = [piece.num_positions for piece in job.spoken]
        kept = context_that_fits(len(prompt.input_ids), sizes, params.context_pieces, params.context_positions)
        prompt = build_long_form_prompt(prompt, self.processor, job.spoken[len(job.spoken) - kept :])
        job.context_used.append(kept)
        job.prompt_positions.append(len(prompt.input_ids))
        return prompt

    def _remember(self, job: _Job, codes: torch.Tensor) -> None:
        """Keep the piece just spoken as context of the next ones (only the last `context_pieces`)."""
        wanted = job.request.params.context_pieces
        if wanted and job.piece + 1 < len(job.pieces):
            job.spoken = [*job.spoken, spoken_piece(self.processor, job.pieces[job.piece], codes)][-wanted:]

    def _end_piece(
        self, job: _Job, index: int, columns: torch.Tensor, decoder: StreamingCodec, stream: bool, spec
    ) -> Iterator[Chunk]:
        codes, repaired = columns_to_codes(columns, spec.bos_id, spec.eos_id)
        job.frames += codes.shape[1]
        job.repaired += repaired
        job.stops.append(stop_reason(columns, spec.eos_id))
        self._remember(job, codes)
        if stream:
            for samples in decoder.push(codes):
                yield self._audio(job, index, samples)
            yield self._audio(job, index, decoder.finish(codes))
        else:
            yield self._audio(job, index, decode_codes(self.codec, codes))

    def _audio(self, job: _Job, index: int, samples: np.ndarray) -> Chunk:
        if job.first_audio is None and len(samples):
            job.first_audio = time.perf_counter() - job.started
        job.audio.append(samples)
        return Chunk(index, samples)

    def _result(self, job: _Job) -> CloneResult:
        waveform = np.concatenate(job.audio) if job.audio else np.zeros(0, dtype=np.float32)
        return CloneResult(
            waveform=waveform.astype(np.float32),
            sample_rate=SAMPLE_RATE,
            seconds_taken=time.perf_counter() - job.started,
            first_audio_seconds=job.first_audio,
            frames=job.frames,
            stops=job.stops,
            pieces=job.pieces,
            seed=job.seed,
            repaired_codes=job.repaired,
            context_pieces=job.context_used,
            prompt_positions=job.prompt_positions,
        )

    def _job(self, request: CloneRequest, started: float) -> _Job:
        pieces = split_sentences(self.normalize(request.target_text), max_chars=200)
        if not pieces:
            raise InferenceError("target text is empty after normalisation")
        reference = self.reference(request.reference_audio, request.reference_rate, request.reference_text)
        seed = request.params.seed if request.params.seed is not None else secrets.randbelow(2**63)
        return _Job(request=request, pieces=pieces, seed=seed, reference=reference, started=started)

    # ---------------------------------------------------------------------------------------------- inputs

    def scene(self, request: CloneRequest) -> str:
        """The scene `request` is prompted with: its own, else the one recorded with its adapter, else the loaded
        model's (the merged model's or first adapter's run config; the `data.scene` default for a bare base)."""
        if request.scene is not None:
            return request.scene
        return self.scenes.get(request.adapter, self.run_config.data.scene)

    def use_scene(self, scene: str) -> None:
        """Prompt every request that names no scene with `scene` (the `--scene` option of infer and serve)."""
        self.run_config.data.scene = scene
        self.scenes = dict.fromkeys(self.scenes, scene)

    def normalize(self, text: str) -> str:
        """`text` normalised as the training run normalised its transcripts."""
        return normalize_text(text, self.run_config.data)

    def reference(self, samples: np.ndarray, rate: int, text: str) -> Reference:
        """The conditioned, encoded reference (cached by the samples' and text's content; infer.reference)."""
        return self.references.get(samples, rate, text)

    def warm_up(self, max_positions: int) -> list[tuple[int, int]]:
        """Compile the decode step for every (batch, cache) bucket up to `max_positions` (prompt + columns) before
        the first request; returns the buckets warmed, as (batch, slots); none when the step is not compiled."""
        if not self.decoder.bucket:
            return []
        num_codebooks = self.model.config.num_codebooks
        codes = torch.zeros((num_codebooks, 2 * FRAMES_PER_SECOND), dtype=torch.long)  # 2 s of code 0
        prompt = build_prompt(self.processor, "warm up", codes, "warm up")
        return self.decoder.warm_up(prompt, max_positions)

    def _adapter(self, name: str | None):
        """A context in which the model runs with adapter `name` (None: without any adapter)."""
        from contextlib import nullcontext

        if not self.adapters:
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()

    def describe(self) -> dict:
        """What is loaded, for logs and the server's /health."""
        return {
            "model": self.run_config.model.path,
            "adapters": self.adapters,
            "device": str(self.decoder.device),
            "dtype": str(self.decoder.dtype).removeprefix("torch."),
            "cache": self.decoder.cache_kind,
            "compiled": self.decoder._step is not self.decoder._forward,
            "max_batch": self.max_batch,
            "prompt": self.run_config.data.prompt_settings(),
            "adapter_scenes": self.scenes,
            "frames_per_second": FRAMES_PER_SECOND,
            "sample_rate": SAMPLE_RATE,
        }


def _run_config_for(model_dir: Path, adapters: dict[str, str]) -> RunConfig:
    """The training run config that says how texts and audio were normalised: the first adapter's, else the merged
    model's copy, else the defaults (which are what training uses unless told otherwise)."""
    for candidate in [Path(p) / RUN_CONFIG for p in adapters.values()] + [model_dir / RUN_CONFIG]:
        if candidate.is_file():
            cfg = load_config(candidate)
            cfg.model.path = str(model_dir)
            return cfg
    cfg = RunConfig()
    cfg.model.path = str(model_dir)
    return cfg


def _attach_adapters(model, adapters: dict[str, str]):
    """The base wrapped in PEFT with every adapter loaded under its name (the first one active)."""
    from peft import PeftModel

    names = list(adapters)
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise InferenceError(f"adapter {name!r}: {path} has no adapter_config.json")
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name, is_trainable=False)
    return peft_model.eval()
