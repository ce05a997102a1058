"""Listening to the model while it trains: a few held-out clips generated and scored at every evaluation step.

The held-out loss says whether the model predicts held-out codes better; it does not say whether the voice it makes
is closer to the reference. At each evaluation the trainer calls `GenerationProbe.run`, which

1. generates the same few held-out pairs every time (`choose_pairs`: one speaker after another, targets no longer
   than `train.eval_sample_seconds`, fixed seeds), with the training model itself and the inference core's decode
   loop (`generation.Decoder`, `SamplingParams` defaults: what `python -m higgs_lora.infer` would produce). The
   pairs are split over the ranks; under ZeRO-3 every forward pass is collective, so the ranks decode in lockstep
   and a rank with no pair of its own decodes a copy of the first and drops it;
2. gathers the codes on rank 0, which decodes them with the codec on the CPU (the memory plan of the GPU has no room
   set aside for the codec, and a few seconds of audio take a moment on a CPU);
3. scores them with `scoring.score_generated` (resemblyzer similarity to the reference, DNSMOS) and logs
   `eval/similarity`, `eval/dnsmos_{sig,bak,ovrl}`, `eval/eos_fraction` (clips the model ended itself) next to the
   held-out loss, plus the same scores of the real held-out target (`*_ground_truth`: what a perfect model would
   get, computed once); with `train.eval_asr` also `eval/cer` and `eval/wer` (a local Whisper or CTC model
   transcribes the clips on rank 0's CPU; scoring normalisation of the pairs' language) and `eval/cer_ground_truth`.
   The other ranks do not wait here: they go on to the next collective (the checkpoint, or the next step's first
   all-reduce) and wait there for rank 0, so the evaluation costs them rank 0's decode + scoring time, no more;
4. writes the clips as an inference folder, `<output_dir>/eval_samples/step_NNNNNNNN/` (`manifest.jsonl` +
   wavs; references and ground-truth targets in `eval_samples/references/` and `targets/`), which
   `python -m higgs_lora.evaluate --pred` reads (CER with an ASR model, `--compare` with step 0: base vs tuned),
   and the audio to TensorBoard.

References and targets are the codec's resynthesis of the cached codes, the audio the model was conditioned on, so
the codec's own loss does not count against the model and the probe needs nothing but the cache.

Scoring problems (a clip too short to embed, DNSMOS failing, the `eval` extras not installed) are logged as a
warning and never stop training; the clips are written all the same.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from higgs_lora.constants import SAMPLE_RATE, STEP_NAME
from higgs_lora.data.sampler import Pair
from higgs_lora.infer.sampling import SamplingParams
from higgs_lora.logs import get_logger

log = get_logger("eval")

FOLDER = "eval_samples"
_UNCHECKED = object()


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe generates and how it scores it (from `train.eval_samples`, `eval_sample_seconds`,
    `eval_dnsmos` and the run's seed)."""

    count: int = 4
    max_seconds: float = 6.0
    dnsmos: bool = True
    seed: int = 0
    temperature: float = SamplingParams.temperature
    """The inference default; 0 (greedy) only in tests that compare codes across batch layouts."""
    asr: str = ""
    """`train.eval_asr`: a local ASR checkpoint for CER/WER; empty: none (said once)."""
    language: str = "ar"
    """Language of the pairs' texts: what the ASR is told and which scoring normalisation CER/WER use."""


def choose_pairs(
    samples: list[Pair], speakers: list[str], frames: list[int], count: int, max_frames: int
) -> list[Pair]:
    """Up to `count` of the held-out `samples`, the same for the same inputs: speakers in turn (sorted), each
    speaker's targets in cache order, those longer than `max_frames` only when no shorter one is left."""
    by_speaker: dict[str, list[Pair]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: (frames[s.target] > max_frames, s.target)):
        by_speaker[speakers[sample.target]].append(sample)
    queues = [by_speaker[s] for s in sorted(by_speaker)]
    chosen: list[Pair] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        chosen.extend(q[rank] for q in queues if rank < len(q))
    # Every speaker's first pair before anyone's second, but short targets before long ones overall (stable sort).
    chosen.sort(key=lambda s: frames[s.target] > max_frames)
    return chosen[:count]


@dataclass
class _Clip:
    index: int
    codes: torch.Tensor
    stop: str
    repaired: int


class GenerationProbe:
    """Generates and scores the chosen held-out pairs; `run` is collective (every rank calls it)."""

    def __init__(
        self,
        pairs: list[Pair],
        data,
        settings: ProbeSettings,
        output_dir: Path,
        rank: int,
        world_size: int,
        folder: str = FOLDER,
    ):
        self.pairs, self.data, self.settings = pairs, data, settings
        self.root = Path(output_dir) / folder
        self.rank, self.world_size = rank, world_size
        self._ground_truth: dict | None = None
        self._asr_ground_truth: dict | None = None
        self._transcriber = None
        self._said_no_asr = False
        self._scoring: object = _UNCHECKED
        self._references: dict[int, np.ndarray] = {}
        self._targets: dict[int, np.ndarray] = {}
        self._written: set[Path] = set()

    # ---------------------------------------------------------------------------------------- generation

    def generate(self, model, device: torch.device) -> list[_Clip]:
        """This rank's share of the pairs, decoded in lockstep with the other ranks (collective)."""
        from higgs_lora.data.collate import build_prompt
        from higgs_lora.distributed import all_reduce_sum, raise_if_any_failed
        from higgs_lora.infer.decode import DecodeLoop, columns_to_codes, stop_reason
        from higgs_lora.infer.sampling import make_generator

        mine = list(range(self.rank, len(self.pairs), self.world_size))
        rows = mine or [0]  # a rank without a pair of its own still has to take part in every forward pass
        data = self.data
        decoder = DecodeLoop(model, cache="dynamic", inference_mode=False)
        spec = decoder.spec
        prompts, params, generators, error = [], [], [], None
        try:
            for i in rows:
                pair = self.pairs[i]
                reference = torch.from_numpy(np.asarray(data.cache[pair.reference]["codes"]))
                prompts.append(
                    build_prompt(
                        data.processor, data.texts[pair.reference], reference, data.texts[pair.target], data.scene
                    )
                )
                params.append(
                    SamplingParams(
                        temperature=self.settings.temperature,
                        seed=self.settings.seed + i,
                        max_seconds=self.settings.max_seconds,
                    )
                )
                generators.append(make_generator(self.settings.seed + i, decoder.device))
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
        # Each rank builds different prompts: one that fails must not leave the others waiting in the first
        # collective forward pass. (A failure in the middle of decoding cannot be coordinated; it ends the run.)
        raise_if_any_failed(error, "building the evaluation prompts")

        def all_done(done: bool) -> bool:
            return all_reduce_sum([0.0 if done else 1.0], decoder.device)[0] == 0

        columns: list[list[torch.Tensor]] = [[] for _ in rows]
        finished = [False] * len(rows)
        for column in decoder.run(prompts, params, generators, all_done if self.world_size > 1 else None):
            for row in range(len(rows)):
                if not finished[row]:
                    columns[row].append(column.codes[row])
                    finished[row] = bool(column.finished[row])
        clips = []
        for row, i in enumerate(mine):
            stacked = torch.stack(columns[row])
            codes, repaired = columns_to_codes(stacked, spec.bos_id, spec.eos_id)
            clips.append(_Clip(i, codes, stop_reason(stacked, spec.eos_id), repaired))
        return clips

    # ------------------------------------------------------------------------------------------ one step

    def run(self, model, step: int, device: torch.device, writer=None) -> dict:
        """Generate (all ranks), then decode, score, write and log on rank 0. Returns rank 0's metrics ({} on the
        other ranks, and on rank 0 when scoring failed)."""
        from higgs_lora.distributed import gather_objects

        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            clips = self.generate(model, device)
        finally:
            model.train(was_training)
        gathered = gather_objects(clips)
        if gathered is None:
            return {}
        clips = sorted((c for part in gathered for c in part), key=lambda c: c.index)
        generate_seconds = time.perf_counter() - started
        try:
            return self._score_and_write(clips, step, generate_seconds, writer)
        except Exception as err:  # noqa: BLE001 - writing or decoding trouble (a full disk...) must not cost the run
            log.warning(
                f"the evaluation clips of step {step} could not be decoded or written: {type(err).__name__}: {err}"
            )
            return {}

    def _score_and_write(self, clips: list[_Clip], step: int, generate_seconds: float, writer) -> dict:
        from higgs_lora.infer.streaming_codec import decode_codes

        started = time.perf_counter()
        codec = self.data.processor.audio_tokenizer
        waveforms = [decode_codes(codec, clip.codes) for clip in clips]
        references = [self._decoded(self._references, self.pairs[c.index].reference) for c in clips]
        targets = [self._decoded(self._targets, self.pairs[c.index].target) for c in clips]
        seconds = [len(w) / SAMPLE_RATE for w in waveforms]
        self._write(step, clips, waveforms, seconds)
        if writer is not None:
            for clip, waveform in zip(clips, waveforms):
                if len(waveform):
                    writer.add_audio(
                        f"{self.root.name}/{clip.index:02d}",
                        torch.from_numpy(waveform)[None],
                        step,
                        sample_rate=SAMPLE_RATE,
                    )
        metrics = {
            "eos_fraction": sum(c.stop == "eos" for c in clips) / len(clips),
            "generated_seconds": float(np.mean(seconds)),
            "generate_seconds": generate_seconds,
        }
        parts = [
            f"step {step} | {len(clips)} clips generated in {generate_seconds:.1f} s, "
            f"{sum(c.stop == 'eos' for c in clips)} ended by the model"
        ]
        use_dnsmos = self._scorable()
        if use_dnsmos is not None:
            try:
                scores, truth = self._score(references, waveforms, targets, use_dnsmos)
            except Exception as err:  # noqa: BLE001 - a scoring problem must never cost a training run
                log.warning(f"scoring the clips of step {step} failed: {type(err).__name__}: {err}")
                scores = {"num_scored": 0.0, "num_failed": float(len(clips))}
                truth = self._ground_truth or {}
            metrics.update({**scores, **truth})
            if "similarity" in scores:
                ceiling = truth.get("similarity_ground_truth")
                parts.append(
                    f"similarity {scores['similarity']:.3f}"
                    + (f" (ground truth {ceiling:.3f})" if ceiling is not None else "")
                )
            if "dnsmos_ovrl" in scores:
                parts.append(f"DNSMOS OVRL {scores['dnsmos_ovrl']:.2f}")
            silent = int(scores.get("num_silent", 0))
            if silent:
                parts.append(f"{silent} near-silent (clip or reference): no similarity, not a clone")
            if scores["num_failed"] - silent:
                parts.append(f"{int(scores['num_failed'] - silent)} too short or silent to score")
        if self.settings.asr:
            try:
                rates = self._asr_scores(clips, waveforms, targets)
            except Exception as err:  # noqa: BLE001 - an ASR problem must never cost a training run
                log.warning(f"transcribing the clips of step {step} failed: {type(err).__name__}: {err}")
                rates = {}
            metrics.update(rates)
            if "cer" in rates:
                truth = (
                    f" (ground truth {rates['cer_ground_truth']:.3f} / {rates['wer_ground_truth']:.3f})"
                    if "cer_ground_truth" in rates
                    else ""
                )
                parts.append(
                    f"CER {rates['cer']:.3f} WER {rates['wer']:.3f}{truth}, "
                    f"ASR {rates['asr_seconds_per_clip']:.2f} s/clip"
                )
        elif not self._said_no_asr:
            parts.append("CER/WER skipped: no train.eval_asr given")
            self._said_no_asr = True
        metrics["score_seconds"] = time.perf_counter() - started
        parts.append(f"decoded, written and scored in {metrics['score_seconds']:.1f} s")
        log.info(" | ".join(parts) + f" | {self.root / STEP_NAME.format(step)}")
        return metrics

    def _score(self, references, waveforms, targets, use_dnsmos: bool) -> tuple[dict, dict]:
        """(scores of the clips, scores of the ground truth: computed once, `*_ground_truth` keys)."""
        from higgs_lora.eval.scoring import score_generated

        scores = score_generated(
            [(r, SAMPLE_RATE, w, SAMPLE_RATE) for r, w in zip(references, waveforms)], dnsmos=use_dnsmos
        )
        if self._ground_truth is None:
            truth = score_generated(
                [(r, SAMPLE_RATE, t, SAMPLE_RATE) for r, t in zip(references, targets)], dnsmos=use_dnsmos
            )
            self._ground_truth = {f"{k}_ground_truth": v for k, v in truth.items() if not k.startswith("num_")}
        return scores, self._ground_truth

    def load_asr(self) -> None:
        """Rank 0: load `settings.asr` now (AsrError if it is unusable), so a bad path fails before training."""
        if self.settings.asr and self._transcriber is None:
            from higgs_lora.eval.asr import load_asr

            self._transcriber = load_asr(self.settings.asr, key="train.eval_asr=")

    def _asr_scores(self, clips: list[_Clip], waveforms, targets) -> dict:
        """CER/WER of the clips against their target texts (scoring normalisation of `settings.language`), the
        ASR seconds per clip, and the same rates of the real targets (`*_ground_truth`, transcribed once)."""
        from higgs_lora.eval.text import EmptyReferenceError, corpus_rates, error_counts

        self.load_asr()
        language = self.settings.language
        texts = [self.data.texts[self.pairs[c.index].target] for c in clips]

        def rates_of(audio: list[np.ndarray]) -> dict | None:
            counts = []
            for text, waveform in zip(texts, audio):
                hypothesis = self._transcriber.transcribe(waveform, SAMPLE_RATE, language) if len(waveform) else ""
                try:
                    counts.append(error_counts(text, hypothesis, language))
                except EmptyReferenceError:
                    continue  # nothing to score against: left out of both sums
            return corpus_rates(counts)

        started = time.perf_counter()
        rates = rates_of(waveforms)
        if rates is None:
            return {}
        metrics = {**rates, "asr_seconds_per_clip": (time.perf_counter() - started) / len(clips)}
        if self._asr_ground_truth is None:
            truth = rates_of(targets) or {}
            self._asr_ground_truth = {f"{k}_ground_truth": v for k, v in truth.items()}
        return {**metrics, **self._asr_ground_truth}

    def _scorable(self) -> bool | None:
        """None when the speaker encoder is not installed (the clips are then only written), else whether DNSMOS
        is to be used (asked for and installed). Checked once; what is missing is said once."""
        if self._scoring is _UNCHECKED:
            from importlib.util import find_spec

            missing_speaker = find_spec("resemblyzer") is None
            missing_dnsmos = [n for n in ("speechmos", "onnxruntime") if find_spec(n) is None]
            if missing_speaker:
                log.warning(
                    f"resemblyzer is not installed (pip install 'higgs-lora[eval]'): the evaluation "
                    f"clips are written to {self.root} but not scored"
                )
                self._scoring = None
            else:
                if self.settings.dnsmos and missing_dnsmos:
                    log.warning(
                        f"{', '.join(missing_dnsmos)} not installed (pip install 'higgs-lora[eval]'): "
                        "the evaluation clips are scored for similarity only, without DNSMOS"
                    )
                self._scoring = self.settings.dnsmos and not missing_dnsmos
        return self._scoring

    def _decoded(self, cache: dict[int, np.ndarray], utterance: int) -> np.ndarray:
        """The codec's resynthesis of a cached utterance (decoded once per run)."""
        if utterance not in cache:
            from higgs_lora.infer.streaming_codec import decode_codes

            codes = torch.from_numpy(np.asarray(self.data.cache[utterance]["codes"]))
            cache[utterance] = decode_codes(self.data.processor.audio_tokenizer, codes)
        return cache[utterance]

    # --------------------------------------------------------------------------------------------- files

    def _write(self, step: int, clips: list[_Clip], waveforms: list[np.ndarray], seconds: list[float]) -> None:
        """step_NNNNNNNN/ as `python -m higgs_lora.infer` writes a folder (published whole, atomically), and the
        references and targets it points to: named by the cache's source id, so a folder written by an earlier run
        with other pairs never points at the wrong recording, and (re)written once per process."""
        from higgs_lora.data.audio import wav_bytes
        from higgs_lora.files import atomic_write_bytes, staged_directory

        data = self.data
        for clip in clips:
            pair = self.pairs[clip.index]
            for folder, cache, utterance in (
                ("references", self._references, pair.reference),
                ("targets", self._targets, pair.target),
            ):
                path = self.root / folder / audio_name(data.source_ids[utterance])
                if path not in self._written:
                    atomic_write_bytes(path, wav_bytes(cache[utterance], SAMPLE_RATE))
                    self._written.add(path)
        with staged_directory(self.root / STEP_NAME.format(step)) as staging:
            lines = []
            for clip, waveform, duration in zip(clips, waveforms, seconds):
                pair = self.pairs[clip.index]
                name = f"{clip.index:02d}.wav"
                (staging / name).write_bytes(wav_bytes(waveform, SAMPLE_RATE))
                lines.append(
                    {
                        "index": clip.index,
                        "id": f"{clip.index:02d}",
                        "wav": name,
                        "reference_audio": f"../references/{audio_name(data.source_ids[pair.reference])}",
                        "reference_text": data.texts[pair.reference],
                        "reference_source_id": data.source_ids[pair.reference],
                        "target_text": data.texts[pair.target],
                        "target_audio": f"../targets/{audio_name(data.source_ids[pair.target])}",
                        "target_source_id": data.source_ids[pair.target],
                        "speaker": data.utterances[pair.target].speaker,
                        "duration_s": duration,
                        "frames": int(clip.codes.shape[1]),
                        "stop": clip.stop,
                        "seed": self.settings.seed + clip.index,
                        "repaired_codes": clip.repaired,
                        "step": step,
                    }
                )
            (staging / "manifest.jsonl").write_text(
                "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8"
            )
            (staging / "run.json").write_text(
                json.dumps(
                    {
                        "source": "training evaluation",
                        "step": step,
                        "max_seconds": self.settings.max_seconds,
                        "temperature": self.settings.temperature,
                        "count": len(clips),
                    },
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )


def audio_name(source_id: str) -> str:
    """A file name for a cached utterance: its source id made safe (`manifest.jsonl:12` -> `manifest.jsonl_12`),
    plus a short hash of the id itself, since two ids can become the same once made safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", source_id)[-80:].strip("._") or "utterance"
    return f"{safe}-{hashlib.sha1(source_id.encode()).hexdigest()[:8]}.wav"
