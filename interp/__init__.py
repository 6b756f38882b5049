"""Interpretability: top-k collection, feature statistics, feature pages (more arrive with later stages)."""
