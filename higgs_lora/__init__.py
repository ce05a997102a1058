"""higgs-lora: LoRA/QLoRA fine-tuning of Higgs Audio v2 for Arabic zero-shot voice cloning.

`import higgs_lora` is cheap: heavy libraries (torch, transformers, deepspeed) are imported where they are used.
The Python API (docs/python_api.md) is importable from here and loaded on first use: `load_config`, `RunConfig`,
`prepare_corpus`, `train_adapter`, `VoiceCloner`, `SamplingParams`.
"""

__version__ = "0.1.0"

_API = {
    "load_config": "higgs_lora.config",
    "RunConfig": "higgs_lora.config",
    "prepare_corpus": "higgs_lora.api",
    "train_adapter": "higgs_lora.api",
    "VoiceCloner": "higgs_lora.infer.cloner",
    "SamplingParams": "higgs_lora.infer.sampling",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'higgs_lora' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
