"""higgs-lora: LoRA/QLoRA fine-tuning of Higgs Audio v2 for Arabic zero-shot voice cloning.

`import higgs_lora` is cheap: heavy libraries (torch, transformers, deepspeed) are imported where they are used.
"""

__version__ = "0.1.0"
