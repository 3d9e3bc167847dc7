"""Spatial neighbourhood graphs, built per section (never across sections or sites)."""
