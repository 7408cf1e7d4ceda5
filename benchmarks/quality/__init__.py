"""LAVA vs LoRA quality benchmark at equal trainable-parameter budgets (``python -m benchmarks.quality.run``)."""
