"""Speech recognition for CER/WER, from a local checkpoint the user provides; never downloaded.

`--asr DIR` is a directory in the transformers layout (config.json, weights, and the processor/tokenizer files),
for example one made with `huggingface-cli download openai/whisper-large-v3 --local-dir DIR` on a machine with
network access. Two kinds are recognised from config.json:

* **Whisper** (`model_type` "whisper"): sequence-to-sequence; decoded with `language="ar", task="transcribe"`
  when the checkpoint's generation config knows Arabic (multilingual Whisper does), greedy, so the transcript is
  deterministic. Whisper reads at most 30 s per call; longer clips are transcribed in consecutive 30 s pieces.
* **CTC** (an architecture ending in "ForCTC": wav2vec2, HuBERT, MMS, XLS-R fine-tunes): greedy argmax decoding.

Everything loads with `local_files_only=True`, so a missing file is an error here, not a silent download.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from higgs_lora.data.audio import resample
from higgs_lora.errors import UserError

ASR_RATE = 16000
"""Sample rate both Whisper and wav2vec2-style models expect (Hz)."""
WHISPER_CHUNK_SECONDS = 30.0
MAX_NEW_TOKENS = 200
"""Cap on Whisper's output per 30 s piece (a 30 s Arabic utterance is ~100 tokens; garbage can loop forever)."""
WHISPER_START_TOKENS = 4


class AsrError(UserError, ValueError):
    """The ASR directory cannot be used; the message says why and what to do."""


def asr_kind(path: str | Path, key: str = "--asr ") -> str:
    """ "whisper" or "ctc" for a local checkpoint directory, from its config.json; AsrError otherwise."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise AsrError(
            f"{key}{path}: no config.json there. Give a local transformers checkpoint directory (Whisper or a "
            "CTC model such as wav2vec2), e.g. made with `huggingface-cli download openai/whisper-large-v3 "
            "--local-dir DIR` on a machine with network access."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type") == "whisper":
        return "whisper"
    if any(str(a).endswith("ForCTC") for a in config.get("architectures") or []):
        return "ctc"
    raise AsrError(
        f"{key}{path}: model_type={config.get('model_type')!r}, architectures={config.get('architectures')!r}; "
        "supported are Whisper (model_type 'whisper') and CTC models (an architecture ending in 'ForCTC')"
    )


class Transcriber:
    """A loaded ASR model: ``transcribe(samples, rate) -> text``. Build with :func:`load_asr`."""

    def __init__(self, path: Path, kind: str, model, processor, device: str):
        self.path, self.kind, self.model, self.processor, self.device = path, kind, model, processor, device
        self._language_options = self._whisper_language_options("ar") if kind == "whisper" else {}

    def _whisper_language_options(self, language: str) -> dict:
        config = self.model.generation_config
        if f"<|{language}|>" in (getattr(config, "lang_to_id", None) or {}):
            return {"language": language, "task": "transcribe"}
        return {}  # an English-only or custom Whisper: let it decode as it was trained

    def transcribe(self, samples: np.ndarray, sample_rate: int, language: str = "ar") -> str:
        """Transcript of a mono float signal at ``sample_rate`` Hz (whitespace-stripped, special tokens removed);
        Whisper is told ``language`` when it knows it."""
        if self.kind == "whisper" and language != "ar":
            options = self._whisper_language_options(language)
        else:
            options = self._language_options
        import torch

        audio = resample(np.asarray(samples, dtype=np.float32), sample_rate, ASR_RATE)
        with torch.inference_mode():
            if self.kind == "whisper":
                chunk = int(WHISPER_CHUNK_SECONDS * ASR_RATE)
                pieces = [self._whisper(audio[i : i + chunk], options) for i in range(0, max(1, len(audio)), chunk)]
                return " ".join(p for p in pieces if p)
            return self._ctc(audio)

    def _whisper(self, audio: np.ndarray, options: dict) -> str:
        features = self.processor.feature_extractor(audio, sampling_rate=ASR_RATE, return_tensors="pt")
        input_features = features.input_features.to(self.device, self.model.dtype)
        # The start tokens (<|startoftranscript|><|ar|><|transcribe|><|notimestamps|>) share the decoder's
        # max_target_positions (448 in the released models) with the output; generate refuses to exceed it.
        max_new_tokens = min(MAX_NEW_TOKENS, self.model.config.max_target_positions - WHISPER_START_TOKENS)
        ids = self.model.generate(input_features, max_new_tokens=max_new_tokens, do_sample=False, **options)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

    def _ctc(self, audio: np.ndarray) -> str:
        inputs = self.processor(audio, sampling_rate=ASR_RATE, return_tensors="pt")
        logits = self.model(inputs.input_values.to(self.device, self.model.dtype)).logits
        # <unk> and the like are not text anyone said: dropped, like Whisper's special tokens.
        return self.processor.batch_decode(logits.argmax(dim=-1), skip_special_tokens=True)[0].strip()


def load_asr(path: str | Path, device: str = "cpu", key: str = "--asr ") -> Transcriber:
    """Load a local Whisper or CTC checkpoint offline (``local_files_only=True``); AsrError if it is unusable (its
    message names the setting as ``key``, e.g. "train.eval_asr=")."""
    from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq, AutoProcessor

    path = Path(path)
    kind = asr_kind(path, key)
    model_class = AutoModelForSpeechSeq2Seq if kind == "whisper" else AutoModelForCTC
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        model = model_class.from_pretrained(path, local_files_only=True)
    except OSError as err:
        raise AsrError(f"{key}{path}: cannot load the {kind} checkpoint offline ({err})") from None
    model.eval().to(device)
    return Transcriber(path, kind, model, processor, device)
