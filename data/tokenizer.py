"""Tokenizers behind one interface: GPT-2 through tiktoken, or a byte-level BPE trained with `tokenizers`.

Id layout, the same for both (n = the tokenizer's own vocabulary, which includes BOS/EOS):

    0 .. n-1   text ids (BOS = EOS = `<|endoftext|>`, as in GPT-2)
    n          [MASK]   the absorbing state of the diffusion process
    n + 1      [PAD]
    .. vocab_size - 1   unused rows that round the embedding up to a multiple of 64

[MASK] and [PAD] lie outside the text vocabulary, so the model can be told never to predict them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from core.files import UserError, write_text_atomic

# The Rust tokenizers use their own thread pool; worker processes are this project's one knob for
# parallel tokenization, so benchmarks measure what they claim to.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _byte_level_alphabet() -> dict[str, int]:
    """The inverse of GPT-2's byte→printable-character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code points 256+.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


class Tokenizer:
    """encode/decode plus the special ids; subclasses supply the text tokenizer."""

    name: str
    n_vocab: int  # text vocabulary, BOS/EOS included
    bos_id: int

    @property
    def eos_id(self) -> int:
        return self.bos_id

    @property
    def mask_id(self) -> int:
        return self.n_vocab

    @property
    def pad_id(self) -> int:
        return self.n_vocab + 1

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table: text ids + [MASK] + [PAD], padded to a multiple of 64."""
        return round_up(self.n_vocab + 2)

    def encode(self, text: str) -> list[int]:
        """Text ids of `text`; special-token strings inside it are treated as plain text."""
        raise NotImplementedError

    def _decode_text(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one text id stands for (a piece of a UTF-8 character, possibly)."""
        raise NotImplementedError

    def spec(self) -> dict:
        """What config.json stores to rebuild this tokenizer."""
        raise NotImplementedError

    def save_for_transformers(self, folder: str | os.PathLike) -> None:
        """Save as a `transformers` fast tokenizer with [MASK] and [PAD] registered as special tokens at
        this project's ids, so `AutoTokenizer.from_pretrained(folder)` encodes and decodes as we do."""
        fast = self._transformers_tokenizer()
        fast.add_special_tokens({"mask_token": "[MASK]", "pad_token": "[PAD]"})
        if (fast.mask_token_id, fast.pad_token_id) != (self.mask_id, self.pad_id):
            raise UserError(f"the transformers tokenizer put [MASK]/[PAD] at {fast.mask_token_id}/"
                            f"{fast.pad_token_id}, not {self.mask_id}/{self.pad_id}")
        fast.save_pretrained(str(folder))
        # transformers 5 names the class "TokenizersBackend", which transformers 4 cannot load; both load this
        # name to the same fast tokenizer (tests/test_export_tokenizer.py)
        config = Path(folder) / "tokenizer_config.json"
        values = json.loads(config.read_text())
        values["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_text_atomic(config, json.dumps(values, indent=2, sort_keys=True) + "\n")

    def _transformers_tokenizer(self):
        raise NotImplementedError

    def save(self, folder: str | os.PathLike) -> None:
        """Write whatever `load_tokenizer(spec, folder)` needs into `folder`."""

    def decode(self, ids: Iterable[int], mask_text: str = "_") -> str:
        """Text of `ids`; [MASK] shows as `mask_text`, [PAD] and unused rows as nothing."""
        out, run = [], []
        for i in map(int, ids):
            if i < self.n_vocab:
                run.append(i)
                continue
            if run:
                out.append(self._decode_text(run))
                run = []
            if i == self.mask_id:
                out.append(mask_text)
        if run:
            out.append(self._decode_text(run))
        return "".join(out)


class TiktokenTokenizer(Tokenizer):
    """GPT-2's BPE through tiktoken (needs a one-time download of the encoding, then cached)."""

    def __init__(self, encoding) -> None:
        self.enc = encoding
        self.name = encoding.name
        self.n_vocab = encoding.n_vocab
        self.bos_id = encoding.eot_token

    @classmethod
    def from_name(cls, name: str = "gpt2") -> "TiktokenTokenizer":
        import tiktoken

        try:
            return cls(tiktoken.get_encoding(name))
        except ValueError as e:  # tiktoken's "unknown encoding"
            raise UserError(f"unknown tiktoken encoding {name!r}: {e}") from None
        except Exception as e:  # network errors come from requests/urllib, whose types vary
            raise UserError(
                f"the tiktoken encoding {name!r} could not be downloaded ({type(e).__name__}); "
                "offline, use a byte-level BPE instead (--tokenizer bpe:4096, trained on your corpus) "
                "or put the cached encoding in TIKTOKEN_CACHE_DIR") from None

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _decode_text(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def spec(self) -> dict:
        return {"kind": "tiktoken", "name": self.name}

    def _transformers_tokenizer(self):
        from transformers import AutoTokenizer

        if self.name != "gpt2":
            raise UserError(f"no transformers tokenizer is known for the tiktoken encoding {self.name!r}")
        try:
            return AutoTokenizer.from_pretrained("gpt2")  # the same BPE as tiktoken's gpt2 encoding
        except OSError as e:
            raise UserError(f"could not fetch the gpt2 tokenizer from the Hugging Face hub ({e.__class__.__name__})"
                            "; export where the hub is reachable") from None


class BPETokenizer(Tokenizer):
    """A byte-level BPE from the `tokenizers` library, stored as tokenizer.json."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.tok.encode_special_tokens = True  # "<|endoftext|>" typed in a document stays text
        self.n_vocab = tok.get_vocab_size(with_added_tokens=True)
        bos = tok.token_to_id(EOT)
        if bos is None:
            raise UserError(f"tokenizer has no {EOT} token; train it with data.tokenizer.train_bpe")
        self.bos_id = bos
        self.name = f"bpe{self.n_vocab}"
        self._to_byte = _byte_level_alphabet()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises plain Exception on a malformed file
            raise UserError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode_text(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id == self.bos_id:
            return EOT.encode()
        return bytes(self._to_byte[c] for c in self.tok.id_to_token(token_id))

    def spec(self) -> dict:
        return {"kind": "bpe", "file": TOKENIZER_FILE, "n_vocab": self.n_vocab}

    def _transformers_tokenizer(self):
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import PreTrainedTokenizerFast

        tok = HFTokenizer.from_str(self.tok.to_str())  # a copy: adding tokens must not touch ours
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT)

    def save(self, folder: str | os.PathLike) -> None:
        write_text_atomic(Path(folder) / TOKENIZER_FILE, self.tok.to_str(pretty=True))


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE (every byte is in the alphabet, so any text round-trips)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise UserError(f"a byte-level BPE needs a vocabulary of at least 258 (256 bytes + {EOT}), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def parse_tokenizer_name(name: str) -> tuple[str, int | str | None]:
    """'gpt2' → ('tiktoken', 'gpt2'); 'bpe' / 'bpe:4096' → ('bpe', size); a path → ('file', path)."""
    if name in ("gpt2", "cl100k_base", "o200k_base", "r50k_base", "p50k_base"):
        return "tiktoken", name
    if name == "bpe" or name.startswith("bpe:"):
        size = name.partition(":")[2] or "4096"
        try:
            return "bpe", int(size)
        except ValueError:
            raise UserError(f"tokenizer {name!r}: the BPE vocabulary size must be an integer, as in bpe:4096") from None
    if name.endswith(".json"):
        return "file", name
    raise UserError(f"unknown tokenizer {name!r}; use gpt2, bpe:<vocab size> (trained on the corpus) "
                    "or the path of a tokenizer.json")


def load_tokenizer(spec: dict, folder: str | os.PathLike | None = None) -> Tokenizer:
    """Rebuild the tokenizer described by `spec` (as written by `Tokenizer.spec()`)."""
    kind = spec.get("kind")
    if kind == "tiktoken":
        return TiktokenTokenizer.from_name(spec["name"])
    if kind == "bpe":
        return BPETokenizer.from_file(Path(folder or ".") / spec["file"])
    raise UserError(f"unknown tokenizer spec {json.dumps(spec)}")
