"""Evaluation: zero-shot classification and retrieval, corruption grids, detection robustness."""
