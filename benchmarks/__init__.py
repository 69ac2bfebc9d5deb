"""Benchmarks: train_step.py (step, MFU, PyTorch peer, end to end), input_pipeline.py."""
