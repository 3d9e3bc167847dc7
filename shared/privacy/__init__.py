"""Differential privacy at a site: DP-SGD, accounting, the privacy ledger."""
