"""The config system: YAML + overrides, errors that name the key, round trips, help text, shipped configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from higgs_lora import config as C
from higgs_lora.config import ConfigError, RunConfig, build_config, load_config, save_config
from higgs_lora.config.help import main as config_main

REPO_ROOT = Path(__file__).resolve().parents[3]


def problems_of(tree=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        build_config(tree or {}, overrides)
    return info.value.problems


def test_defaults_are_the_seed_design():
    cfg = build_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.1)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.data.sample_rate == 24000
    assert cfg.model.dtype == "bf16"


def test_overrides_set_nested_values_with_types():
    cfg = build_config(
        {"train": {"lr": 0.1}},
        ["train.lr=2e-4", "lora.r=32", "model.gradient_checkpointing=false", "data.scene=غرفة هادئة", "seed=7"],
    )
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.r == 32
    assert cfg.model.gradient_checkpointing is False
    assert cfg.data.scene == "غرفة هادئة"
    assert cfg.seed == 7


def test_yaml_float_without_dot_is_a_float():
    # PyYAML reads `2e-4` as a string; a float field must still take it.
    cfg = build_config(yaml.safe_load("train:\n  lr: 2e-4\n"))
    assert cfg.train.lr == pytest.approx(2e-4)


@pytest.mark.parametrize("override", ["lora.target_modules=[q_proj,v_proj]", "lora.target_modules=q_proj,v_proj"])
def test_list_overrides(override):
    assert build_config({}, [override]).lora.target_modules == ["q_proj", "v_proj"]


def test_string_fields_take_text_as_typed():
    # YAML would turn `no` into False and `007` into 7; a string field keeps what the user typed.
    cfg = build_config({}, ["train.resume=no", "name=007"])
    assert cfg.train.resume == "no" and cfg.name == "007"


def test_unknown_yaml_key_names_the_key_and_suggests():
    problems = problems_of({"train": {"learning_rate": 1e-4}})
    assert len(problems) == 1
    assert "train.learning_rate" in problems[0]


def test_unknown_yaml_key_close_match():
    problems = problems_of({"lora": {"rank": 4, "alpah": 3}})
    assert any("lora.alpah" in p and "did you mean lora.alpha" in p for p in problems)
    assert any("lora.rank" in p for p in problems)


def test_unknown_section_and_unknown_override():
    problems = problems_of({"trian": {"lr": 1}}, ["train.lrr=1"])
    assert any("unknown key trian" in p and "did you mean train" in p for p in problems)
    assert any("train.lrr" in p and "did you mean train.lr" in p for p in problems)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.max_steps=ten", "train.max_steps", "integer"),
        ("train.max_steps=2.5", "train.max_steps", "integer"),
        ("train.lr=fast", "train.lr", "number"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing", "bool"),
        ("model.dtype=fp8", "model.dtype", "'bf16'"),
        ("lora.target_modules=5", "lora.target_modules", "list"),
    ],
)
def test_wrong_type_override_names_key(override, key, expected):
    problems = problems_of(overrides=[override])
    assert len(problems) == 1
    assert problems[0].startswith(key) and expected in problems[0]


def test_wrong_type_in_yaml_names_key():
    problems = problems_of({"model": {"dtype": 16}, "train": {"log_every": "often"}})
    assert any(p.startswith("model.dtype") for p in problems)
    assert any(p.startswith("train.log_every") for p in problems)


def test_malformed_override():
    assert "not key=value" in problems_of(overrides=["train.lr"])[0]
    assert "names a section" in problems_of(overrides=["train=3"])[0]
    assert "is a value, not a section" in problems_of(overrides=["seed.x=3"])[0]


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["data.min_seconds=30"], ["data.min_seconds", "data.max_seconds"]),
        (["data.reference_min_seconds=12"], ["data.reference_min_seconds", "data.reference_max_seconds"]),
        (["model.attn_implementation=flash_attention_2", "model.dtype=fp32"], ["flash_attention_2"]),
        (["train.text_loss_weight=0.5"], ["train.text_loss_weight", "model.use_text_head"]),
        (["train.max_steps=0", "train.epochs=0"], ["train.max_steps", "train.epochs"]),
        (["lora.dropout=1.0"], ["lora.dropout"]),
        (["plan.zero_stage=1"], ["plan.zero_stage"]),
        (["model.quantization=nf4", "plan.offload=optimizer+params"], ["model.quantization", "plan.offload"]),
    ],
)
def test_impossible_combinations(overrides, keys):
    problems = problems_of(overrides=overrides)
    assert len(problems) == 1, problems
    for key in keys:
        assert key in problems[0]


def test_micro_batch_smaller_than_one_sample_says_what_to_do():
    (problem,) = problems_of(overrides=["train.micro_batch_tokens=512"])
    # 20 s target + 10 s reference at 25 frames/s, each segment + 9 delay positions = 768 positions.
    assert "768" in problem and "data.max_seconds" in problem and "raise it" in problem
    assert build_config({}, ["train.micro_batch_tokens=768"]).train.micro_batch_tokens == 768


def test_all_problems_reported_at_once():
    problems = problems_of(overrides=["lora.r=0", "train.lr=0", "data.min_seconds=25"])
    assert len(problems) == 3


def test_yaml_round_trip(tmp_path):
    cfg = build_config(
        {"name": "Higgs-Audio-2-ar", "data": {"scene": "تسجيل في غرفة هادئة"}},
        ["lora.target_modules=[q_proj,v_proj]", "train.lr=3e-5", "plan.gpu_memory_gib=24", "model.quantization=nf4"],
    )
    path = save_config(cfg, tmp_path / "resolved.yaml")
    loaded = load_config(path)
    assert loaded == cfg
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    assert "تسجيل" in path.read_text(encoding="utf-8")  # stored readable, not escaped


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_every_field_has_help_text():
    rows = C.describe_keys()
    assert len(rows) > 30
    missing = [key for key, _, _, doc in rows if not doc]
    assert missing == []
    text = C.format_help()
    assert "train.micro_batch_tokens (int, default 0)" in text
    assert "Model positions per micro-batch" in text


def test_cli_prints_resolved_config_and_reports_errors(capsys, tmp_path):
    assert config_main(["train.lr=1e-3", "--save", str(tmp_path / "out.yaml")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == pytest.approx(1e-3)
    assert load_config(tmp_path / "out.yaml").train.lr == pytest.approx(1e-3)
    assert config_main(["trian.lr=1"]) == 2
    assert "trian" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert load_config(save_config(cfg, tmp_path / "x.yaml")) == cfg


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, higgs_lora.config.schema; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_yaml_file_with_unknown_key_and_wrong_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  path: build/tiny/model\ntrain:\n  lr: 1.0e-4\n  max_stepz: 10\n  log_every: often\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.max_stepz" in message and "did you mean train.max_steps" in message
    assert "train.log_every='often' is not an integer" in message
