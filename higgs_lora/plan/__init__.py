"""The run's plan: ZeRO stage, offload, checkpointing, micro-batch and the resolved DeepSpeed config.

Pure: reads numbers (run config, DeepSpeed JSON, the checkpoint's config.json, hardware, sequence statistics), never
torch or a process group; may import config and data's cache reader. The modules, each importing only those before
it (ds_config names choice's Plan for type checking only): errors (PlanError), inputs (sample lengths, model sizes),
memory (the memory model), hardware, ds_config (the DeepSpeed JSON), choice (make_plan), cli (`higgs-lora plan`).
See docs/planning.md.
"""

from higgs_lora.plan.choice import Plan, make_plan, memory_table
from higgs_lora.plan.ds_config import (
    AUTO_DS_CONFIG,
    STAGE3_ONLY,
    ds_stage_and_offload,
    load_ds_config,
    resolve_ds_config,
)
from higgs_lora.plan.errors import PlanError
from higgs_lora.plan.hardware import (
    Hardware,
    describe_hardware,
    detect_hardware,
    parse_memory,
)
from higgs_lora.plan.inputs import (
    PROMPT_OVERHEAD_TOKENS,
    RELEASED_MODEL_CONFIG,
    TEXT_TOKENS_PER_LETTER,
    ModelSizes,
    SequenceStats,
    cache_sequence_stats,
    lora_parameter_count,
    model_sizes,
    read_model_config,
    sequence_stats,
)
from higgs_lora.plan.memory import (
    ALL_CANDIDATES,
    BUDGET_STEP,
    CANDIDATES,
    COEFFICIENTS,
    GIB,
    Candidate,
    Coefficients,
    MemoryModel,
    Term,
    bucket_size,
    prefetch_bucket_size,
)

__all__ = [
    "ALL_CANDIDATES",
    "AUTO_DS_CONFIG",
    "BUDGET_STEP",
    "CANDIDATES",
    "COEFFICIENTS",
    "GIB",
    "PROMPT_OVERHEAD_TOKENS",
    "RELEASED_MODEL_CONFIG",
    "STAGE3_ONLY",
    "TEXT_TOKENS_PER_LETTER",
    "Candidate",
    "Coefficients",
    "Hardware",
    "MemoryModel",
    "ModelSizes",
    "Plan",
    "PlanError",
    "SequenceStats",
    "Term",
    "bucket_size",
    "cache_sequence_stats",
    "describe_hardware",
    "detect_hardware",
    "ds_stage_and_offload",
    "load_ds_config",
    "lora_parameter_count",
    "make_plan",
    "memory_table",
    "model_sizes",
    "parse_memory",
    "prefetch_bucket_size",
    "read_model_config",
    "resolve_ds_config",
    "sequence_stats",
]
