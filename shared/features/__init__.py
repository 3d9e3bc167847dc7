"""Federated feature space: per-feature statistics, highly variable selection, standardization."""
