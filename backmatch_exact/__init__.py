"""Exact and approximate back-matching propagation for torch.nn networks."""

__version__ = "0.1.0"
