"""The model: loading base, processor and codec from local directories (both layouts recognised), LoRA on top."""
