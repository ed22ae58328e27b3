"""Disentanglement metrics, factor naming and pictures; numpy and scikit-learn only (no torch)."""
