"""Models: the masked-diffusion transformer, its objective, the optimizers (more arrive with later stages)."""
