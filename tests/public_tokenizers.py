"""Released-style model folders with real byte-level BPE tokenizers, at a tiny size: a tokenizers-trained BPE
(the 256 byte symbols and a few merges) with the special tokens at the config's ids. LLaDA-style folders
ship it as tokenizer.json; Dream-style folders as vocab.json + merges.txt + added_tokens.json +
tokenizer_config.json and no tokenizer.json, as the released Dream does.

The configs are tests/public_fixtures.py's tiny ones with a vocabulary wide enough for the 256 bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

from tests.public_fixtures import DREAM_TINY, LLADA_TINY, write_public_folder

BPE_SIZE = 300  # ids 0..299: the byte symbols and the merges
ROWS = 320  # embedding rows; the ids above the tokenizer's are unused
LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|reserved_token_0|>", "<|mdm_mask|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
LLADA_BPE_BOS = BPE_SIZE  # <|startoftext|>, in generation_config.json
LLADA_BPE = {**LLADA_TINY, "vocab_size": ROWS, "embedding_size": ROWS, "eos_token_id": BPE_SIZE + 1,
             "pad_token_id": BPE_SIZE + 1, "mask_token_id": BPE_SIZE + 5}
DREAM_BPE = {**DREAM_TINY, "vocab_size": ROWS, "bos_token_id": BPE_SIZE, "eos_token_id": BPE_SIZE,
             "pad_token_id": BPE_SIZE, "mask_token_id": BPE_SIZE + 4}
TEXT_SIZE = {"llada": BPE_SIZE + len(LLADA_SPECIALS), "dream": BPE_SIZE + len(DREAM_SPECIALS)}
# LLaDA-8B-Instruct's chat template, as its tokenizer_config.json has it (the release's own data)
LLADA_CHAT = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
              "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
              "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
              "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
# a ChatML template of the Qwen2 kind Dream-v0-Instruct uses (a default system message, then the turns)
DREAM_CHAT = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\nYou are a helpful assistant."
              "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + "
              "message.content + '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}"
              "{{- '<|im_start|>assistant\n' }}{%- endif %}")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "A masked diffusion model unmasks tokens step by step.",
          "Paris is the capital of France; Berlin is the capital of Germany.", "Numbers: 12, 345, 6789 and 3.14.",
          "Über café naïve — façade, smörgåsbord, 東京, 🙂."]


def train_bytelevel_bpe(corpus: list[str] | None = None):
    """A byte-level BPE (tokenizers) with exactly BPE_SIZE ids and no special tokens yet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((corpus or CORPUS) * 20, trainer=trainer)
    if tok.get_vocab_size() != BPE_SIZE:
        raise AssertionError(f"the fixture BPE has {tok.get_vocab_size()} ids, not {BPE_SIZE}: widen the corpus")
    return tok


def write_tokenizer(folder: Path, family: str, corpus: list[str] | None = None) -> None:
    """The family's released tokenizer files in `folder`, the specials from id BPE_SIZE on."""
    from tokenizers import AddedToken

    tok = train_bytelevel_bpe(corpus)
    specials = LLADA_SPECIALS if family == "llada" else DREAM_SPECIALS
    if family == "llada":
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1],
            "pad_token": specials[1], "add_bos_token": False, "add_eos_token": False, "chat_template": LLADA_CHAT},
            indent=2))
        return
    tok.model.save(str(folder))  # vocab.json and merges.txt
    added = {s: BPE_SIZE + i for i, s in enumerate(specials)}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for s, i in added.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer",
                                                                            None]},
        "added_tokens_decoder": decoder, "bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "unk_token": None, "add_bos_token": False,
        "chat_template": DREAM_CHAT},
        indent=2))


def write_bpe_public_folder(folder: Path, family: str, seed: int = 0, corpus: list[str] | None = None) -> Path:
    """A released-style folder (tests/public_fixtures.py) whose tokenizer is a real byte-level BPE."""
    config = LLADA_BPE if family == "llada" else DREAM_BPE
    write_public_folder(folder, family, config=config, seed=seed, tokenizer=False)
    if family == "llada":
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": LLADA_BPE_BOS}))
    write_tokenizer(folder, family, corpus)
    return folder
