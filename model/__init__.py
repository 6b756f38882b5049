"""Models: the masked-diffusion transformer and its objective, the sampler, the transcoder, the explainer
and judge LLMs, optimizers, precision and multi-process helpers."""
