"""Data: tokenizers, corpora (FineWeb-edu, local text, the synthetic ground-truth corpus), shards, loader."""
