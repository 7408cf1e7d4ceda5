"""lava-peft benchmarks: side-by-side training-step throughput and memory vs HF PEFT (``python -m benchmarks.run``)."""
