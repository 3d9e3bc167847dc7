"""Evaluation: clustering scores and integration (batch mixing) metrics."""
