"""Data: corpus sources, the codec-token cache, the pair sampler and the collator."""
