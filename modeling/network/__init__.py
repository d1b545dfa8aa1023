"""The network: TaRoPE, the per-modality front-ends, the joint encoder, CTM, batches (pure torch, no I/O)."""
