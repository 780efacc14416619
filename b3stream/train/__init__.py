"""Training: InfoNCE loss, schedule-driven sampler, DeepSpeed loop."""
