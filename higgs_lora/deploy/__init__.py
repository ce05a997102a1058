"""Deployment: LoRA weights folded into the base (merge), the merge verified, original checkpoints converted."""
