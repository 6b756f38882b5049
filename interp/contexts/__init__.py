"""Stage 4 (get_topk_activations.py): every transcoder feature's top-activating contexts.

The scan (`scan`), the streaming top-k buffers (`buffers`), context windows (`windows`), the on-disk
feature store (`store`), each feature's output tokens (`logits`), the static feature browser (`browser`)
the stage itself (`stage`), its flags (`config`) and its command (`command`).
"""
