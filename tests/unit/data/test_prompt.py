"""The default cloning prompt is Boson AI's (quiet-room scene in the system turn), token for token as documented in
docs/inference.md ("The prompt"); `data.scene=''` keeps a bare system turn, `data.scene=none` has none."""

from __future__ import annotations

import pytest
import torch

from higgs_lora.config import RunConfig
from higgs_lora.constants import DEFAULT_SCENE
from higgs_lora.data.collate import build_example, build_prompt, prompt_overhead_tokens

REFERENCE_TEXT, TARGET_TEXT = "نص المرجع", "النص الجديد"
NUM_REFERENCE_FRAMES = 6

# The documented layout (docs/inference.md, "The prompt"), written out: {audio} is the reference's T + 9 audio
# positions (T + 2 <|AUDIO_OUT|> then 7 delay tokens, as the processor expands them).
SYSTEM_TURN = (
    "<|start_header_id|>system<|end_header_id|>\n\nGenerate audio following instruction.\n\n"
    "<|scene_desc_start|>\nAudio is recorded from a quiet room.\n<|scene_desc_end|><|eot_id|>"
)
TURNS = (
    "<|start_header_id|>user<|end_header_id|>\n\n{reference_text}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>{audio}<|audio_eos|><|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{target_text}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from higgs_lora.config import ModelConfig
    from higgs_lora.model.loading import load_processor

    return load_processor(ModelConfig(path=str(tiny_checkpoint.model_dir), codec_path=str(tiny_checkpoint.codec_dir)))


def reference_codes() -> torch.Tensor:
    return torch.randint(0, 1024, (8, NUM_REFERENCE_FRAMES), generator=torch.Generator().manual_seed(3))


def documented(processor, system_turn: str) -> list[str]:
    audio = "<|AUDIO_OUT|>" * (NUM_REFERENCE_FRAMES + 2) + "<|reserved_special_token_6|>" * 7
    text = (
        "<|begin_of_text|>"
        + system_turn
        + TURNS.format(reference_text=REFERENCE_TEXT, target_text=TARGET_TEXT, audio=audio)
    )
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return processor.tokenizer.convert_ids_to_tokens(ids)


def rendered(processor, scene: str) -> list[str]:
    prompt = build_prompt(processor, REFERENCE_TEXT, reference_codes(), TARGET_TEXT, scene)
    return processor.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())


def test_the_default_scene_is_boson_quiet_room_scene():
    assert RunConfig().data.scene == DEFAULT_SCENE == "Audio is recorded from a quiet room."


def test_the_default_prompt_is_the_documented_layout_token_for_token(processor):
    tokens = rendered(processor, RunConfig().data.scene)
    expected = documented(processor, SYSTEM_TURN)
    assert len(tokens) == len(expected)
    for i, (got, want) in enumerate(zip(tokens, expected)):
        assert got == want, f"token {i}: {got!r} != {want!r}"
    assert tokens[:2] == ["<|begin_of_text|>", "<|start_header_id|>"]
    assert tokens.count("<|scene_desc_start|>") == 1 and tokens.count("<|scene_desc_end|>") == 1


def test_an_empty_scene_keeps_the_system_turn_without_a_scene_block(processor):
    bare = "<|start_header_id|>system<|end_header_id|>\n\nGenerate audio following instruction.<|eot_id|>"
    assert rendered(processor, "") == documented(processor, bare)


@pytest.mark.parametrize("scene", ["none", "None", " NONE "])
def test_scene_none_renders_no_system_turn_at_all(processor, scene):
    tokens = rendered(processor, scene)
    assert tokens == documented(processor, "")
    assert "system" not in processor.tokenizer.convert_tokens_to_string(tokens)


@pytest.mark.parametrize("scene", [DEFAULT_SCENE, "", "none"])
def test_every_scene_form_keeps_prompt_and_training_sample_in_step(processor, scene):
    ref, target = reference_codes(), torch.randint(0, 1024, (8, 4), generator=torch.Generator().manual_seed(4))
    example = build_example(processor, REFERENCE_TEXT, ref, TARGET_TEXT, target, scene)
    prompt = build_prompt(processor, REFERENCE_TEXT, ref, TARGET_TEXT, scene)
    assert torch.equal(example.input_ids[: len(prompt.input_ids)], prompt.input_ids)
    count = lambda t: len(processor.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    positions = prompt_overhead_tokens(processor, scene) + count(REFERENCE_TEXT) + count(TARGET_TEXT)
    assert example.num_positions == positions + (ref.shape[1] + 9) + (target.shape[1] + 9)


def test_prompt_settings_name_the_scene_and_the_normalisation():
    cfg = RunConfig()
    cfg.data.scene, cfg.data.strip_diacritics = "none", True
    settings = cfg.data.prompt_settings()
    assert settings["scene"] == "none" and settings["strip_diacritics"] is True
    assert set(settings) >= {"scene", "language", "strip_diacritics", "fold_letters", "numbers_to_words"}
