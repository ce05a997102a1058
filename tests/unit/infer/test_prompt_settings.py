"""Inference prompts a model as it was trained: the scene recorded with each adapter (or the merged model) is the
default, `--scene` (use_scene) replaces it for requests that name none, and a request's own scene wins."""

from __future__ import annotations

import shutil

import pytest
import torch

from higgs_lora.config import RunConfig, save_config
from higgs_lora.constants import DEFAULT_SCENE, RUN_CONFIG
from higgs_lora.data.collate import build_prompt
from higgs_lora.infer.cloner import VoiceCloner
from higgs_lora.tiny import REPO_ROOT

REFERENCE = str(REPO_ROOT / "examples" / "demo_corpus" / "spk_f1" / "spk_f1_01.flac")
REFERENCE_TEXT = "تَشْرَبُ الجَدَّةُ الشَّايَ فِي الحَدِيقَةِ"
TARGET = "مرحبا بكم"


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    """Two LoRA adapters on the tiny base whose run configs record different scenes."""
    from peft import LoraConfig, get_peft_model

    from higgs_lora.config import ModelConfig
    from higgs_lora.model.loading import load_base_model

    root = tmp_path_factory.mktemp("scene_adapters")
    paths = {}
    for name, scene in [("bare", "none"), ("studio", "Audio is recorded in a studio.")]:
        base = load_base_model(ModelConfig(path=str(tiny_checkpoint.model_dir), dtype="fp32"))
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        model.save_pretrained(root / name)
        cfg = RunConfig()
        cfg.model.path, cfg.data.scene = str(tiny_checkpoint.model_dir), scene
        save_config(cfg, root / name / RUN_CONFIG)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def cloner(tiny_checkpoint, adapters):
    return VoiceCloner.load(tiny_checkpoint.model_dir, adapters=adapters, device="cpu", dtype="fp32")


def prompt_of(cloner, request) -> torch.Tensor:
    return cloner._prompt(cloner._job(request, 0.0)).input_ids


def expected(cloner, scene: str) -> torch.Tensor:
    reference = cloner.reference(*_samples(cloner), REFERENCE_TEXT)
    return build_prompt(cloner.processor, reference.text, reference.codes, cloner.normalize(TARGET), scene).input_ids


def _samples(cloner):
    request = cloner.request(REFERENCE, REFERENCE_TEXT, TARGET)
    return request.reference_audio, request.reference_rate


def test_each_adapter_is_prompted_with_the_scene_recorded_with_it(cloner):
    assert cloner.scenes == {"bare": "none", "studio": "Audio is recorded in a studio."}
    for adapter, scene in [("bare", "none"), ("studio", "Audio is recorded in a studio.")]:
        request = cloner.request(REFERENCE, REFERENCE_TEXT, TARGET, adapter=adapter)
        assert cloner.scene(request) == scene
        assert torch.equal(prompt_of(cloner, request), expected(cloner, scene))
    # The base without an adapter: the loaded run config's scene (the first adapter's here).
    assert cloner.scene(cloner.request(REFERENCE, REFERENCE_TEXT, TARGET)) == "none"


def test_a_request_scene_wins_over_the_recorded_one(cloner):
    request = cloner.request(REFERENCE, REFERENCE_TEXT, TARGET, adapter="bare", scene="Audio is recorded outdoors.")
    assert torch.equal(prompt_of(cloner, request), expected(cloner, "Audio is recorded outdoors."))
    assert not torch.equal(prompt_of(cloner, request), expected(cloner, "none"))


def test_a_bare_base_gets_boson_default_scene_and_a_merged_folder_its_recorded_one(tiny_checkpoint, tmp_path):
    base = VoiceCloner.load(tiny_checkpoint.model_dir, device="cpu", dtype="fp32")
    request = base.request(REFERENCE, REFERENCE_TEXT, TARGET)
    assert base.scene(request) == DEFAULT_SCENE
    assert torch.equal(prompt_of(base, request), expected(base, DEFAULT_SCENE))
    base.use_scene("")  # what --scene '' does
    assert base.scene(request) == "" and base.scene(base.request(REFERENCE, REFERENCE_TEXT, TARGET, scene="a")) == "a"
    # A merged folder carries the run config (merge writes higgs_lora.yaml); a copy of the base with one stands in.
    merged = tmp_path / "merged"
    shutil.copytree(tiny_checkpoint.model_dir, merged)
    cfg = RunConfig()
    cfg.data.scene = "none"
    save_config(cfg, merged / RUN_CONFIG)
    loaded = VoiceCloner.load(merged, codec_path=str(tiny_checkpoint.codec_dir), device="cpu", dtype="fp32")
    assert loaded.scene(loaded.request(REFERENCE, REFERENCE_TEXT, TARGET)) == "none"
    assert loaded.describe()["prompt"]["scene"] == "none"
