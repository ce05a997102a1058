"""Inference: the one cloning core (prompt, decode loop, sampling, streaming codec) and the batch CLI over it."""
