"""Everything of a merged directory but its weights: config (with the new dtype), generation config, tokenizer,
chat template, processor config, the codec under `audio_tokenizer/`, licence files, NOTICE, the model card and the
provenance record `higgs_lora_merge.json`.

May import the merge plan, the shard helpers and the training checkpoint's licence text. See docs/deploy.md
("Merge", "Files").
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from typing import TYPE_CHECKING

from higgs_lora.config import save_config
from higgs_lora.constants import RUN_CONFIG
from higgs_lora.deploy.merge_plan import ADAPTER_FILES, MERGE_MARKER, MergePlan
from higgs_lora.deploy.shards import sha256_file
from higgs_lora.files import atomic_write_json, atomic_write_text
from higgs_lora.model.loading import portable_codec_reference
from higgs_lora.run_folder import licence_notice

if TYPE_CHECKING:
    from pathlib import Path

    from higgs_lora.deploy.merge import MergeResult

CODEC_SUBDIR = "audio_tokenizer"
SUPPORT_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Copied from the base as they are (config.json and processor_config.json are rewritten)."""


def write_support_files(plan: MergePlan, staging: Path) -> list[str]:
    """Config, generation config, tokenizer, processor config, codec and licence files; returns what was copied."""
    from higgs_lora.model.loading import torch_dtype

    config = json.loads((plan.base / "config.json").read_text(encoding="utf-8"))
    config.pop("torch_dtype", None)
    config["dtype"] = str(torch_dtype(plan.dtype)).removeprefix("torch.")
    config.pop("_name_or_path", None)
    atomic_write_json(staging / "config.json", config)
    copied = ["config.json"]
    licence_files = [p.name for p in plan.base.iterdir() if p.is_file() and re.match(r"^LICEN[CS]E", p.name, re.I)]
    for name in (*SUPPORT_FILES, *licence_files):
        if (plan.base / name).is_file():
            shutil.copy2(plan.base / name, staging / name)
            copied.append(name)
    shutil.copytree(plan.codec, staging / CODEC_SUBDIR, ignore=shutil.ignore_patterns(".*"))
    copied.append(f"{CODEC_SUBDIR}/ (codec from {plan.codec})")
    processor_file = plan.base / "processor_config.json"
    if processor_file.is_file():
        # The base's Hub id for its codec is kept (fine-tuning never changes the codec, and a Hub id loads on any
        # machine); a local path is not written: the copy in audio_tokenizer/ is what travels with the folder.
        processor = portable_codec_reference(json.loads(processor_file.read_text(encoding="utf-8")))
        atomic_write_json(staging / "processor_config.json", processor)
        copied.append("processor_config.json")
    # The run config travels with the merged model: inference reads its prompt settings (scene, text normalisation)
    # from it, so the merged model is prompted as the adapter was trained.
    save_config(plan.cfg, staging / RUN_CONFIG)
    copied.append(RUN_CONFIG)
    atomic_write_text(staging / "NOTICE", licence_notice("model"))
    atomic_write_text(staging / "README.md", _model_card(plan))
    return copied


def _model_card(plan: MergePlan) -> str:
    cfg = plan.cfg
    step = f" at step {plan.adapter.step}" if plan.adapter.step is not None else ""
    return (
        f"# {plan.out.name}\n\n"
        f"Higgs Audio v2 with the LoRA adapter of run `{cfg.name}`{step} merged in (r={cfg.lora.r}, "
        f"alpha={cfg.lora.alpha}, targets: {', '.join(cfg.lora.target_modules)}; trained on a "
        f"{'4-bit NF4' if cfg.model.quantization == 'nf4' else cfg.model.dtype} base), for zero-shot voice cloning "
        f"(language: {cfg.data.language}). Weights in {plan.dtype}; written by `python -m higgs_lora.merge`.\n\n"
        f"Base model: `{plan.base}`. Adapter: `{plan.adapter.path}`. Provenance: `{MERGE_MARKER}`.\n\n"
        f"Prompt settings it was trained with (in `{RUN_CONFIG}`; `infer` and `serve` use them): "
        f"`{json.dumps(cfg.data.prompt_settings(), ensure_ascii=False)}`.\n\n"
        "Load with plain transformers:\n\n```python\n"
        "from transformers import AutoProcessor, HiggsAudioV2ForConditionalGeneration, HiggsAudioV2TokenizerModel\n"
        "model = HiggsAudioV2ForConditionalGeneration.from_pretrained(THIS_DIR)\n"
        f"codec = HiggsAudioV2TokenizerModel.from_pretrained(THIS_DIR + '/{CODEC_SUBDIR}')\n"
        "processor = AutoProcessor.from_pretrained(THIS_DIR, audio_tokenizer=codec)\n```\n\n"
        "The weights are under the Boson Higgs Audio 2 Community License (see NOTICE): a distributed fine-tune's name "
        'must start with "Higgs Audio 2" and it must ship NOTICE.\n'
    )


def provenance(plan: MergePlan, result: MergeResult, verification: dict | None) -> dict:
    """The record written as higgs_lora_merge.json: what was merged into what, how, with which software."""
    from importlib.metadata import version

    base_files = [name for name in ("config.json", "model.safetensors.index.json") if (plan.base / name).is_file()]
    return {
        "tool": "higgs_lora.deploy.merge",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "adapter": str(plan.adapter.path),
        "adapter_step": plan.adapter.step,
        "adapter_sha256": {name: sha256_file(plan.adapter.path / name) for name in ADAPTER_FILES},
        "base": str(plan.base),
        "base_sha256": {name: sha256_file(plan.base / name) for name in base_files},
        "codec": str(plan.codec),
        "dtype": plan.dtype,
        "trained_quantization": plan.cfg.model.quantization,
        "lora": {"r": plan.cfg.lora.r, "alpha": plan.cfg.lora.alpha, "target_modules": plan.cfg.lora.target_modules},
        "prompt": plan.cfg.data.prompt_settings(),
        "tensors": result.num_tensors,
        "merged_weights": result.num_merged,
        "weights_sha256": {path.name: sha256_file(path) for path in result.files},
        "verification": verification,
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "safetensors")},
    }
