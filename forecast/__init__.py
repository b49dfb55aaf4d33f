"""Multivariate forecasting with neural memory (Simba-style)."""
