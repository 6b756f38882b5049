"""The released config.json of LLaDA-8B and Dream-7B (docs/notes/public-diffusion-lms.md §1), every key as the
Hub folders have it: what a full-size model is built from without its weights (on the meta device, or with
random weights on a card: bench/public_models_gpu.py), and what the tests' tiny folders take their flags from.
Loading never reads these: a real folder's own config.json is the truth (model.public_models.public_config)."""
from __future__ import annotations

LLADA_8B = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 4096, "n_layers": 32, "n_heads": 32,
    "n_kv_heads": 32, "multi_query_attention": None, "mlp_hidden_size": 12288, "mlp_ratio": 4, "vocab_size": 126464,
    "embedding_size": 126464, "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081,
    "rope_theta": 500000.0, "rope_full_precision": True, "rms_norm_eps": 1e-05, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "bias_for_layer_norm": False, "attention_layer_norm": False, "include_bias": False,
    "include_qkv_bias": False, "weight_tying": False, "activation_type": "silu", "block_type": "llama",
    "scale_logits": False, "input_emb_norm": False, "alibi": False, "rope": True, "block_group_size": 1,
    "flash_attention": False, "max_sequence_length": 4096, "attention_dropout": 0.0, "embedding_dropout": 0.0,
    "residual_dropout": 0.0, "precision": "amp_bf16", "use_cache": False, "transformers_version": "4.46.3",
}
DREAM_7B = {
    "model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 3584, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
    "mask_token_id": 151666, "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643,
    "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "hidden_act": "silu", "max_position_embeddings": 131072, "use_sliding_window": False, "sliding_window": None,
    "max_window_layers": 28, "attention_dropout": 0.0, "use_mrope": False, "use_cache": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.2",
}
RELEASED = {"llada": LLADA_8B, "dream": DREAM_7B}
