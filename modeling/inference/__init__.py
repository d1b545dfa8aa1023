"""Inference: the predictor, per-file predictions, model sources and the timeline plot."""
