"""data.diacritize: one policy for training transcripts (prepare) and target texts (inference), recorded with the
adapter; a stub diacritiser stands in for the model, and the real package is checked when installed."""

from __future__ import annotations

import importlib.util

import pytest

from higgs_lora.config import ConfigError, RunConfig, build_config
from higgs_lora.data.prepare import prepare_item
from higgs_lora.infer.reference import normalize_text
from higgs_lora.text import diacritize as module
from higgs_lora.text.arabic import normalize_arabic, strip_arabic_diacritics

FATHA = "\u064e"


def stub(text: str) -> str:
    """A fatha after every Arabic letter: obviously not Arabic, obviously applied."""
    return "".join(ch + FATHA if "\u0621" <= ch <= "\u064a" else ch for ch in text)


@pytest.fixture
def stubbed():
    module.use_diacritizer(stub)
    yield
    module.use_diacritizer(None)


def test_auto_marks_bare_words_and_keeps_the_writers_marks(stubbed):
    text = "ذهب الوَلَدُ إلى السوق 3"
    out = normalize_arabic(text, diacritize="auto")
    words = out.split()
    assert words[1] == "الوَلَدُ"  # already diacritised: kept as written
    assert words[0] == stub("ذهب") and words[2] == stub("إلى")
    assert strip_arabic_diacritics(out) == strip_arabic_diacritics(normalize_arabic(text))  # same letters
    assert normalize_arabic(text) == normalize_arabic(text, diacritize="none")  # default: untouched
    assert normalize_arabic(out, diacritize="auto") == out  # idempotent


def test_prepare_and_inference_apply_the_same_policy(stubbed):
    from higgs_lora.data.prepare import Item
    from higgs_lora.data.sources import Utterance
    from higgs_lora.tiny import REPO_ROOT

    cfg = build_config(overrides=["data.diacritize=auto"])
    assert cfg.data.prompt_settings()["diacritize"] == "auto"  # recorded with the adapter's config
    text = "الطقس اليوم معتدل مع رياح خفيفة"
    audio = str(REPO_ROOT / "examples" / "demo_corpus" / "spk_f1" / "spk_f1_02.flac")
    outcome = prepare_item(Item(0, Utterance(audio, text, "spk_f1", "ar", "0")), cfg)
    assert outcome.reason is None, outcome.detail
    spoken = normalize_text(text, cfg.data)  # what inference makes of the same text as a target
    assert outcome.row["text_normalized"] == spoken == stub(text)
    assert normalize_text(text, RunConfig().data) == text  # default 'none': no marks added


def test_auto_with_strip_diacritics_is_refused():
    with pytest.raises(ConfigError, match="data.diacritize=auto"):
        build_config(overrides=["data.diacritize=auto", "data.strip_diacritics=true"])


def test_a_missing_package_is_a_user_error_naming_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "text2tashkeel":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    module._model.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(module.DiacritizerMissing, match=r"higgs-lora\[arabic\]"):
        normalize_arabic("نص", diacritize="auto")
    module._model.cache_clear()


@pytest.mark.skipif(importlib.util.find_spec("text2tashkeel") is None, reason="pip install 'higgs-lora[arabic]'")
def test_the_bundled_model_diacritises_offline():
    module._model.cache_clear()
    out = normalize_arabic("بسم الله الرحمن الرحيم", diacritize="auto")
    assert out == "بِسْمِ اللَّهِ الرَّحْمَنِ الرَّحِيمِ"
    assert normalize_arabic(out, diacritize="auto") == out
