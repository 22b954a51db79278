"""Controlled experiments that check a paper's claim on synthetic data (``aninfonce``).

Import the submodules directly; this package file stays light so that importing it does not pull in torch.
"""
