"""The planner: parameter counts from config.json, the memory model, the choice table, its properties, errors."""

from __future__ import annotations

import itertools
import json

import pytest

from higgs_lora.config import LoraConfig, ModelConfig, load_config
from higgs_lora.plan import (
    GIB,
    RELEASED_MODEL_CONFIG,
    Hardware,
    MemoryModel,
    PlanError,
    detect_hardware,
    load_ds_config,
    lora_parameter_count,
    make_plan,
    model_sizes,
    parse_memory,
    read_model_config,
    sequence_stats,
)
from tests.conftest import FULL_SIZE_CONFIG, REPO_ROOT

ZERO2 = load_ds_config(REPO_ROOT / "ds_configs" / "zero2.json")
ZERO3 = load_ds_config(REPO_ROOT / "ds_configs" / "zero3.json")
ZERO3_OFFLOAD = load_ds_config(REPO_ROOT / "ds_configs" / "zero3_offload.json")
AUTO = load_ds_config("auto")
DS = {"zero2": ZERO2, "zero3": ZERO3, "zero3_offload": ZERO3_OFFLOAD, "auto": AUTO}


def cfg(*overrides, base="arabic_lora"):
    return load_config(REPO_ROOT / "configs" / f"{base}.yaml", list(overrides))


def gpus(per_node: int, gib: float, nodes: int = 1) -> Hardware:
    return Hardware(gpus_per_node=per_node, nodes=nodes, gpu_memory_bytes=int(gib * GIB), name="GPU", source="test")


# ------------------------------------------------------------------------------------------- model sizes


def test_lora_count_matches_peft_on_the_tiny_model(tiny_checkpoint):
    from higgs_lora.model.loading import load_base_model
    from higgs_lora.model.lora import apply_lora, count_parameters

    model_cfg = ModelConfig(path=str(tiny_checkpoint.model_dir), dtype="fp32", gradient_checkpointing=False)
    for lora in (
        LoraConfig(r=8),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        LoraConfig(r=2, target_modules=["q_proj", "audio_lm_head"]),
    ):
        trainable, _ = count_parameters(apply_lora(load_base_model(model_cfg), lora, model_cfg))
        assert lora_parameter_count(read_model_config(model_cfg.path), lora.target_modules, lora.r) == trainable


def test_lora_count_full_size_r16_all_projections():
    # Per layer: q,o 16*(3072+3072) each, k,v 16*(3072+1024) each, 2 MLPs x 3 projections 16*(3072+8192).
    per_layer = 2 * 16 * 6144 + 2 * 16 * 4096 + 2 * 3 * 16 * 11264
    assert lora_parameter_count(FULL_SIZE_CONFIG, list(LoraConfig().target_modules), 16) == 28 * per_layer


@pytest.mark.parametrize("text_head", [False, True])
def test_model_sizes_match_the_tiny_model(tiny_checkpoint, text_head):
    from higgs_lora.model.loading import load_base_model

    model = load_base_model(ModelConfig(path=str(tiny_checkpoint.model_dir), dtype="fp32", use_text_head=text_head))
    sizes = model_sizes(read_model_config(tiny_checkpoint.model_dir), text_head=text_head)
    assert sizes.total == sum(p.numel() for p in model.parameters())
    layer = (
        model.model.layers[0]
        if hasattr(model.model, "layers")
        else next(m for m in model.modules() if type(m).__name__ == "HiggsAudioV2DecoderLayer")
    )
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, __import__("torch").nn.Linear))
    assert sizes.layer_linear == linear and sizes.layer == sum(p.numel() for p in layer.parameters())


def test_released_model_has_5_77_billion_parameters():
    # Counted on the meta device by bench/train_throughput.py --size full --dry-run (docs/benchmarks.md).
    assert model_sizes(RELEASED_MODEL_CONFIG, text_head=True).total == 5_771_283_456
    assert FULL_SIZE_CONFIG.items() <= RELEASED_MODEL_CONFIG.items()


# ------------------------------------------------------------------------------------------- the table

# (config, ds, overrides, hardware, expected (stage, offload, checkpointing))
SCENARIOS = [
    ("arabic_qlora_16gb", "auto", (), gpus(1, 16), (2, "none", True)),
    ("arabic_qlora_16gb", "zero2", (), gpus(1, 16), (2, "none", True)),
    ("arabic_lora", "auto", (), gpus(1, 16), (2, "none", True)),
    ("arabic_lora", "auto", (), gpus(1, 12), (3, "optimizer+params", True)),
    ("arabic_lora", "zero2", (), gpus(1, 16), (2, "none", True)),
    ("arabic_lora", "auto", (), gpus(1, 24), (2, "none", True)),
    ("arabic_lora", "auto", (), gpus(8, 80), (2, "none", False)),
    ("arabic_lora", "auto", ("lora.dropout=0",), gpus(1, 80), (2, "none", False)),
    ("arabic_lora", "auto", (), gpus(8, 40, nodes=2), (2, "none", False)),
    ("arabic_lora", "zero3", (), gpus(8, 40, nodes=2), (3, "none", True)),
    ("arabic_lora", "zero3", ("model.gradient_checkpointing=false",), gpus(8, 80), (3, "none", False)),
    ("arabic_lora", "zero3_offload", (), gpus(1, 24), (3, "optimizer+params", True)),
    ("arabic_lora", "auto", ("model.gradient_checkpointing=true",), gpus(4, 80), (2, "none", True)),
    ("arabic_lora", "auto", ("plan.offload=optimizer",), gpus(1, 24), (2, "optimizer", True)),
    # 32 GB fits the longest sample without checkpointing since the activation coefficients were refitted with the
    # adapters in bf16 as DeepSpeed runs them (2026-12-03; before: checkpointing on).
    ("arabic_lora", "auto", (), gpus(1, 32), (2, "none", False)),
    ("arabic_lora", "auto", ("data.max_seconds=8", "data.reference_max_seconds=6"), gpus(1, 32), (2, "none", False)),
    ("arabic_lora", "auto", (), gpus(1, 141), (2, "none", False)),
    ("arabic_qlora_16gb", "auto", (), gpus(1, 12), (2, "none", True)),
    ("arabic_qlora_16gb", "zero3", (), gpus(2, 16), (3, "none", True)),
]


@pytest.mark.parametrize(
    "name,ds,overrides,hardware,expected",
    SCENARIOS,
    ids=[f"{s[0]}-{s[1]}-{s[3].world_size}x{s[3].gpu_memory_bytes // GIB}G-{i}" for i, s in enumerate(SCENARIOS)],
)
def test_choice_table(name, ds, overrides, hardware, expected):
    config = cfg("train.global_batch_tokens=65536", *overrides, base=name)
    plan = make_plan(config, DS[ds], hardware, RELEASED_MODEL_CONFIG)
    assert (plan.zero_stage, plan.offload, plan.gradient_checkpointing) == expected
    # The plan fits: the predicted peak is within the GPU's memory less the margin ...
    assert plan.predicted_peak <= hardware.gpu_memory_bytes * (1 - config.plan.memory_margin)
    # ... holds the longest sample, reaches the asked global batch, and satisfies DeepSpeed's batch identity.
    assert plan.micro_batch_tokens >= sequence_stats(config).longest
    assert plan.global_batch_tokens >= 65536
    assert plan.global_batch_tokens == plan.micro_batch_tokens * plan.accumulation * plan.world_size
    assert plan.micro_batch_tokens % 64 == 0


def test_memory_table_lists_every_term_and_the_margin():
    plan = make_plan(cfg(), AUTO, gpus(1, 24), RELEASED_MODEL_CONFIG)
    text = plan.describe()
    for term in (
        "frozen base",
        "LoRA weights",
        "fp32 master + Adam",
        "activations",
        "audio logits",
        "CUDA context",
        "sum",
        "GPU memory",
        "margin (10%)",
        "headroom",
    ):
        assert term in text
    assert f"{plan.micro_batch_tokens:,} positions per rank" in text
    frozen = dict(plan.memory)["frozen base"]
    assert frozen == 2 * model_sizes(RELEASED_MODEL_CONFIG, text_head=False).total  # bf16, replicated by ZeRO-2


def test_nf4_base_is_about_a_third_of_bf16():
    bf16 = make_plan(cfg(), ZERO2, gpus(1, 80), RELEASED_MODEL_CONFIG)
    nf4 = make_plan(cfg("model.quantization=nf4"), ZERO2, gpus(1, 80), RELEASED_MODEL_CONFIG)
    ratio = dict(nf4.memory)["frozen base"] / dict(bf16.memory)["frozen base"]
    assert 0.25 < ratio < 0.35  # layers at ~0.52 byte/weight, embeddings and heads stay bf16


# ------------------------------------------------------------------------------------------ properties

MEMORIES = [12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 141]


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("arabic_lora", ()),
        ("arabic_qlora_16gb", ()),
        ("arabic_lora", ("train.global_batch_tokens=65536",)),
        ("arabic_lora", ("lora.dropout=0", "train.global_batch_tokens=262144")),
    ],
)
@pytest.mark.parametrize("ds", ["auto", "zero2", "zero3"])
@pytest.mark.parametrize("world", [1, 8])
def test_more_memory_never_gives_a_smaller_budget(name, overrides, ds, world):
    config = cfg(*overrides, base=name)
    budgets = []
    for gib in MEMORIES:
        try:
            budgets.append(make_plan(config, DS[ds], gpus(world, gib), RELEASED_MODEL_CONFIG).micro_batch_tokens)
        except PlanError:
            assert not budgets, f"{gib} GiB does not fit but less memory did"
    assert budgets == sorted(budgets) and budgets


@pytest.mark.parametrize("quantization,offload", [("none", "none"), ("nf4", "none"), ("none", "optimizer+params")])
def test_zero3_static_memory_never_grows_with_more_gpus(quantization, offload):
    config = cfg(f"model.quantization={quantization}", f"plan.offload={offload}")
    static = []
    for world in (1, 2, 4, 8, 16, 32, 64):
        plan = make_plan(config, ZERO3, gpus(world, 80), RELEASED_MODEL_CONFIG)
        assert plan.zero_stage == 3
        memory = MemoryModel(
            sizes=model_sizes(RELEASED_MODEL_CONFIG, False),
            trainable=plan.trainable_parameters,
            world_size=world,
            dtype="bf16",
            quantization=quantization,
            lora_dropout=0.1,
            seq=sequence_stats(config),
            hidden=3072,
            intermediate=8192,
        )
        from higgs_lora.plan import Candidate

        static.append(sum(t.fixed for t in memory.terms(Candidate(3, offload, True))))
    assert all(a >= b for a, b in zip(static, static[1:])) and static[0] > static[-1]


@pytest.mark.parametrize("world,global_tokens", list(itertools.product([1, 3, 8, 16], [0, 50000, 65536, 1 << 20])))
def test_batch_identity_and_global_batch(world, global_tokens):
    config = cfg(f"train.global_batch_tokens={global_tokens}")
    plan = make_plan(config, AUTO, gpus(world, 80), RELEASED_MODEL_CONFIG)
    assert plan.global_batch_tokens == plan.micro_batch_tokens * plan.accumulation * world
    if global_tokens:
        assert plan.global_batch_tokens >= global_tokens
        # Trimmed: one micro-batch less per step would miss the target, and no rank holds a needless extra step.
        assert (
            plan.micro_batch_tokens - 64
        ) * plan.accumulation * world < global_tokens or plan.micro_batch_tokens - 64 < sequence_stats(config).longest
    else:
        assert plan.accumulation == 1


# ------------------------------------------------------------------------------------ pins and errors


def test_pinned_budget_is_respected_and_the_rest_planned_around_it():
    plan = make_plan(cfg("train.micro_batch_tokens=2048"), AUTO, gpus(1, 40), RELEASED_MODEL_CONFIG)
    assert plan.micro_batch_tokens == 2048 and not plan.gradient_checkpointing  # 2048 fits without checkpointing
    plan = make_plan(cfg("train.micro_batch_tokens=6144"), AUTO, gpus(1, 40), RELEASED_MODEL_CONFIG)
    assert plan.micro_batch_tokens == 6144 and plan.gradient_checkpointing
    assert plan.accumulation == 11  # ceil(65,536 / 6,144): the pinned budget is not trimmed to the global batch


def test_pinned_budget_that_cannot_fit_says_what_would():
    with pytest.raises(PlanError) as err:
        make_plan(
            cfg("train.micro_batch_tokens=16384", "model.gradient_checkpointing=false"),
            ZERO2,
            gpus(1, 24),
            RELEASED_MODEL_CONFIG,
        )
    message = str(err.value)
    assert "does not fit 1 x 24 GiB" in message
    assert "train.micro_batch_tokens=" in message and "checkpointing" in message


def test_infeasible_run_lists_qlora_more_gpus_and_shorter_samples():
    with pytest.raises(PlanError) as err:
        make_plan(cfg("plan.offload=none"), AUTO, gpus(1, 12), RELEASED_MODEL_CONFIG)
    message = str(err.value)
    assert "model.quantization=nf4" in message
    assert "GPUs of this size with ZeRO-3" in message
    with pytest.raises(PlanError) as err:
        make_plan(
            cfg(
                "model.quantization=nf4",
                "data.max_seconds=30",
                "data.reference_max_seconds=20",
                "model.gradient_checkpointing=false",
            ),
            ZERO2,
            gpus(1, 16),
            RELEASED_MODEL_CONFIG,
        )
    assert "data.max_seconds=" in str(err.value)


def test_conflicting_pins_are_reported_together_with_what_to_do():
    with pytest.raises(PlanError) as err:
        make_plan(
            cfg("plan.zero_stage=3", "plan.offload=none", "model.quantization=nf4"), ZERO3_OFFLOAD, 1, FULL_SIZE_CONFIG
        )
    message = str(err.value)
    assert "plan.offload=none" in message and "QLoRA" in message
    with pytest.raises(PlanError, match="zero3.json"):
        make_plan(cfg("plan.zero_stage=3"), ZERO2, 1, FULL_SIZE_CONFIG)


def test_without_a_gpu_memory_is_not_planned():
    plan = make_plan(
        cfg("train.micro_batch_tokens=8192", "train.global_batch_tokens=32768"), ZERO2, 1, FULL_SIZE_CONFIG
    )
    assert (plan.zero_stage, plan.offload, plan.accumulation, plan.memory) == (2, "none", 4, ())
    assert "memory not planned" in plan.describe()


def test_cache_lengths_tighten_the_longest_sample():
    config = cfg()
    assert (
        sequence_stats(config, longest_target_frames=250, longest_text_letters=100).longest
        < sequence_stats(config).longest
    )


# --------------------------------------------------------------------------------------------- hardware


@pytest.mark.parametrize(
    "text,expected",
    [("24GiB", 24 * GIB), ("80GB", 80 * 10**9), ("16", 16 * GIB), ("40 gib", 40 * GIB), ("1.5TiB", int(1.5 * 1024**4))],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-4GiB", ""])
def test_parse_memory_rejects_nonsense(bad):
    with pytest.raises(PlanError):
        parse_memory(bad)


def test_detect_hardware_from_slurm_launcher_and_overrides():
    h200 = (8, 141 * GIB, "NVIDIA H200")
    slurm = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"}
    found = detect_hardware(cfg(), env=slurm, cuda=h200)
    assert (found.gpus_per_node, found.nodes, found.gpu_memory_bytes, found.name) == (8, 2, 141 * GIB, "NVIDIA H200")
    launcher = {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4"}
    assert detect_hardware(cfg(), env=launcher, cuda=h200, world_size=4).world_size == 4
    # The process group wins in a running job.
    running = detect_hardware(cfg(), env={}, cuda=h200, world_size=16)
    assert (running.gpus_per_node, running.nodes) == (8, 2)
    # slurm/train.sbatch: one srun task per GPU, each seeing only its bound GPU; the job is still 2 x 8.
    bound = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)"}
    job = detect_hardware(cfg(), env=bound, cuda=(1, 141 * GIB, "NVIDIA H200"), world_size=16)
    assert (job.gpus_per_node, job.nodes) == (8, 2)
    given = detect_hardware(
        cfg("plan.gpus_per_node=8", "plan.nodes=2", "plan.gpu_memory_gib=40"), env={}, cuda=(0, 0, "")
    )
    assert (given.world_size, given.gpu_memory_bytes) == (16, 40 * GIB)
    assert detect_hardware(cfg(), env={}, cuda=(0, 0, "")).gpu_memory_bytes is None  # CPU: nothing to plan


def test_plan_json_round_trips():
    plan = make_plan(cfg(), AUTO, gpus(2, 40), RELEASED_MODEL_CONFIG)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["micro_batch_tokens"] == plan.micro_batch_tokens
    assert abs(data["predicted_peak_bytes"] - sum(data["memory"].values())) < 1


def test_command_prints_the_plan_and_writes_json(tmp_path, capsys):
    from higgs_lora.plan.cli import main

    out = tmp_path / "plan.json"
    code = main(
        [
            "--config",
            str(REPO_ROOT / "configs" / "arabic_lora.yaml"),
            "--model",
            "released",
            "--gpus",
            "8",
            "--gpu-mem",
            "40GiB",
            "--nodes",
            "2",
            "--json",
            str(out),
            "--show-ds",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 node(s) x 8 x GPU 40.0 GiB" in printed and "predicted peak per GPU" in printed
    written = json.loads(out.read_text())
    assert written["plan"]["world_size"] == 16 and written["plan"]["nodes"] == 2
    assert written["ds_config"]["train_batch_size"] == 16 * written["plan"]["accumulation"]
    assert f'"stage": {written["plan"]["zero_stage"]}' in printed


def test_command_errors_are_exit_2_with_the_fix(capsys):
    from higgs_lora.plan.cli import main

    assert main(["--config", str(REPO_ROOT / "configs" / "arabic_lora.yaml"), "model.path=/nonexistent"]) == 2
    assert "--model released" in capsys.readouterr().err
    assert (
        main(
            [
                "--config",
                str(REPO_ROOT / "configs" / "arabic_lora.yaml"),
                "--model",
                "released",
                "--gpus",
                "1",
                "--gpu-mem",
                "6GiB",
                "plan.offload=none",
            ]
        )
        == 2
    )
    assert "What would fit" in capsys.readouterr().err


def test_two_ranks_on_one_host_are_one_node():
    """`deepspeed --num_gpus 2` on a CPU host (no GPU to count) and torchrun's variables: 1 node x 2, not 2 nodes."""
    deepspeed_env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_SIZE": "1"}
    found = detect_hardware(cfg(), env=deepspeed_env, cuda=(0, 0, ""), world_size=2)
    assert (found.gpus_per_node, found.nodes) == (2, 1)
    torchrun_env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    found = detect_hardware(cfg(), env=torchrun_env, cuda=(0, 0, ""), world_size=2)
    assert (found.gpus_per_node, found.nodes) == (2, 1)
    two_hosts = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "CROSS_SIZE": "2"}
    found = detect_hardware(cfg(), env=two_hosts, cuda=(0, 0, ""), world_size=4)
    assert (found.gpus_per_node, found.nodes) == (2, 2)
