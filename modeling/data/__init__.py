"""Training data: clips of a feature store as model inputs (bounded cache, sampling, augmentation) and speaker-independent splits."""
