"""Text: Arabic normalisation for training, inference and scoring (pure; imports nothing of the package)."""
