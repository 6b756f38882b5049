"""Tokenizers behind one interface: GPT-2 through tiktoken, a byte-level BPE trained with `tokenizers`, or a
released model's own tokenizer (`ModelTokenizer`, below).

Id layout of the first two (n = the tokenizer's own vocabulary, which includes BOS/EOS):

    0 .. n-1   text ids (BOS = EOS = `<|endoftext|>`, as in GPT-2)
    n          [MASK]   the absorbing state of the diffusion process
    n + 1      [PAD]
    .. vocab_size - 1   unused rows that round the embedding up to a multiple of 64

[MASK] and [PAD] lie outside the text vocabulary, so the model can be told never to predict them.
A released model's tokenizer keeps that model's ids instead: its mask token inside the tokenizer, PAD = EOS.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from core.files import UserError, read_json, write_text_atomic

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

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a prompt a user typed: as `encode` (a released model's tokenizer reads its special tokens)."""
        return self.encode(text)

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
        _save_fast(fast, folder)

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


def _save_fast(fast, folder: str | os.PathLike) -> None:
    """save_pretrained, with tokenizer_config.json naming the class both transformers 4 and 5 load."""
    fast.save_pretrained(str(folder))
    # transformers 5 names the class "TokenizersBackend", which transformers 4 cannot load; both load this
    # name to the same fast tokenizer (tests/test_export_tokenizer.py)
    config = Path(folder) / "tokenizer_config.json"
    values = json.loads(config.read_text())
    values["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_text_atomic(config, json.dumps(values, indent=2, sort_keys=True) + "\n")


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
        return cls(_from_json_file(Path(path)))

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


HF_PREFIX = "hf:"  # --tokenizer hf:<folder>: a released model's own tokenizer
MODEL_IDS = ("n_vocab", "bos_id", "eos_id", "mask_id", "pad_id")


def _model_ids(folder: Path) -> dict[str, int]:
    """A released model's ids, from its config.json: n_vocab = the embedding rows (embedding_size, else
    vocab_size: every row gets a logit), EOS, mask, pad (EOS when unset), and BOS (bos_token_id, else that of
    generation_config.json, where LLaDA keeps it)."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json: not a released model's folder")
    cfg = read_json(path)
    generation = folder / "generation_config.json"
    gen = read_json(generation) if generation.is_file() else {}
    keys = {"n_vocab": [cfg.get("embedding_size"), cfg.get("vocab_size")], "eos_id": [cfg.get("eos_token_id")],
            "mask_id": [cfg.get("mask_token_id")], "bos_id": [cfg.get("bos_token_id"), gen.get("bos_token_id")]}
    found = {k: next((v for v in values if v is not None), None) for k, values in keys.items()}
    found["pad_id"] = cfg["pad_token_id"] if cfg.get("pad_token_id") is not None else found["eos_id"]
    shown = {"n_vocab": "vocab_size", "eos_id": "eos_token_id", "mask_id": "mask_token_id",
             "bos_id": "bos_token_id (nor generation_config.json)", "pad_id": "pad_token_id"}
    ids: dict[str, int] = {}
    for key in MODEL_IDS:
        value = found[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{path} has no usable {shown[key]} (got {value!r})")
        ids[key] = value
    return ids


def _source_files(folder: Path) -> list[Path]:
    """The files the tokenizer is built from: tokenizer.json, else vocab.json + merges.txt (+ added_tokens.json)."""
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist")
    if (folder / TOKENIZER_FILE).is_file():
        return [folder / TOKENIZER_FILE]
    pair = [folder / "vocab.json", folder / "merges.txt"]
    if all(p.is_file() for p in pair):
        return pair + [p for p in [folder / "added_tokens.json"] if p.is_file()]
    raise UserError(f"{folder} has no tokenizer files ({TOKENIZER_FILE}, or vocab.json with merges.txt)")


def _qwen2_bpe(folder: Path):
    """vocab.json + merges.txt as transformers' Qwen2 byte-level BPE (Qwen2's pre-tokenizer and NFC), then the
    added tokens of added_tokens.json, each checked to land at its id; the `tokenizers` object inside."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]  # (transformers' lazy exports)

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if "vocab" in inspect.signature(Qwen2TokenizerFast.__init__).parameters:  # transformers 5 takes the contents
        lines = merges.read_text(encoding="utf-8").splitlines()
        pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        fast = Qwen2TokenizerFast(vocab=read_json(vocab), merges=pairs)
    else:
        fast = Qwen2TokenizerFast(vocab_file=str(vocab), merges_file=str(merges))
    added_file = folder / "added_tokens.json"
    added = read_json(added_file) if added_file.is_file() else {}
    for content, want in sorted(added.items(), key=lambda kv: kv[1]):
        fast.add_tokens([AddedToken(content, special=True, normalized=False)], special_tokens=True)
        if (got := fast.convert_tokens_to_ids(content)) != want:
            raise UserError(f"{added_file} puts {content!r} at id {want}, but after vocab.json it lands at {got}")
    return fast.backend_tokenizer


class ModelTokenizer(Tokenizer):
    """A released model's own tokenizer (kind "hf"): LLaDA's tokenizer.json, or Dream's vocab.json + merges.txt
    + added_tokens.json (read as transformers' Qwen2 BPE, no remote code), with the model's ids from its
    config.json: n_vocab = vocab_size = the embedding rows (every row gets a logit), the mask token inside the
    tokenizer, PAD = EOS (a real, predictable token), BOS as the config says. Ids from n_text (the tokenizer's
    size) up are unused rows. A run or dataset folder keeps it as one tokenizer.json; `name` ("hf-" and a hash
    of the source files and ids) tells two such tokenizers apart."""

    KIND = "hf"

    def __init__(self, tok, ids: dict, name: str) -> None:
        tok.encode_special_tokens = True  # a special token's text typed in a document stays text
        self.tok, self.name = tok, name
        self.n_text = tok.get_vocab_size(with_added_tokens=True)
        self.n_vocab, self.bos_id = int(ids["n_vocab"]), int(ids["bos_id"])
        self._eos, self._mask, self._pad = int(ids["eos_id"]), int(ids["mask_id"]), int(ids["pad_id"])
        if self.n_text > self.n_vocab:
            raise UserError(f"the tokenizer has {self.n_text} ids, more than the model's {self.n_vocab} rows")
        for key, value in (("BOS", self.bos_id), ("EOS", self._eos), ("mask", self._mask), ("pad", self._pad)):
            if not 0 <= value < self.n_text:
                raise UserError(f"the model's {key} id {value} is not a token of its tokenizer ({self.n_text} ids)")
        self._added = {int(i): t.content for i, t in tok.get_added_tokens_decoder().items()}
        self._byte_level = "ByteLevel" in repr(tok.decoder)
        self._to_byte = _byte_level_alphabet()

    @classmethod
    def tag(cls, folder: str | os.PathLike) -> str:
        """The name a tokenizer from `folder` gets: 'hf-' and a hash of its source files and the model's ids."""
        folder = Path(folder)
        digest = hashlib.sha256(json.dumps(_model_ids(folder), sort_keys=True).encode())
        for path in _source_files(folder):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return f"hf-{digest.hexdigest()[:12]}"

    @classmethod
    def from_model_folder(cls, folder: str | os.PathLike) -> "ModelTokenizer":
        """The tokenizer of a released model folder (never with remote code)."""
        folder = Path(folder)
        source = _source_files(folder)[0]
        try:
            tok = _from_json_file(source) if source.name == TOKENIZER_FILE else _qwen2_bpe(folder)
        except UserError:
            raise
        except Exception as e:  # tokenizers and transformers raise plain Exceptions on malformed files
            raise UserError(f"{folder}'s tokenizer files cannot be read ({str(e).splitlines()[0][:120]})") from None
        return cls(tok, _model_ids(folder), cls.tag(folder))

    @classmethod
    def from_spec(cls, spec: dict, folder: str | os.PathLike | None) -> "ModelTokenizer":
        missing = [k for k in ("file", "name", *MODEL_IDS) if k not in spec]
        if missing:
            raise UserError(f"the tokenizer spec {json.dumps(spec)} has no {missing[0]!r}")
        return cls(_from_json_file(Path(folder or ".") / spec["file"]), spec, spec["name"])

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def mask_id(self) -> int:
        return self._mask

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def vocab_size(self) -> int:
        """The model's embedding rows (= n_vocab: the specials lie inside)."""
        return self.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids with the special tokens typed in it read as themselves (a chat template such as
        `<|im_start|>user ...`, or BOS), where `encode` keeps a document's text as text."""
        self.tok.encode_special_tokens = False
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = True

    def _decode_text(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def decode(self, ids: Iterable[int], mask_text: str = "_") -> str:
        """Text of `ids`; the mask token shows as `mask_text`, the unused rows as nothing, every other token
        (BOS, EOS = PAD included) as its text."""
        out, run = [], []
        for i in map(int, ids):
            if i < self.n_text and i != self.mask_id:
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

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        if token_id >= self.n_text:
            return b""
        piece = self.tok.id_to_token(token_id)
        if self._byte_level and all(ch in self._to_byte for ch in piece):
            return bytes(self._to_byte[ch] for ch in piece)
        return self.tok.decode([token_id]).encode()  # not a byte-level vocabulary: its text

    def spec(self) -> dict:
        ids = {"n_vocab": self.n_vocab, "bos_id": self.bos_id, "eos_id": self.eos_id, "mask_id": self.mask_id,
               "pad_id": self.pad_id}
        return {"kind": self.KIND, "file": TOKENIZER_FILE, "name": self.name, **ids, "n_text": self.n_text}

    def save(self, folder: str | os.PathLike) -> None:
        write_text_atomic(Path(folder) / TOKENIZER_FILE, self.tok.to_str(pretty=True))

    def _transformers_tokenizer(self):
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import PreTrainedTokenizerFast

        name = self.tok.id_to_token
        return PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(self.tok.to_str()),
                                       bos_token=name(self.bos_id), eos_token=name(self.eos_id),
                                       pad_token=name(self.pad_id), mask_token=name(self.mask_id))

    def save_for_transformers(self, folder: str | os.PathLike) -> None:
        """Save as a `transformers` fast tokenizer with the model's BOS, EOS, pad and mask tokens registered."""
        _save_fast(self._transformers_tokenizer(), folder)


def _from_json_file(path: Path):
    """A `tokenizers` Tokenizer from a tokenizer.json (one-line errors)."""
    from tokenizers import Tokenizer as HFTokenizer

    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception on a malformed file
        raise UserError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None


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
    """'gpt2' → ('tiktoken', 'gpt2'); 'bpe' / 'bpe:4096' → ('bpe', size); a path → ('file', path);
    'hf:<model folder>' → ('hf', folder): a released model's own tokenizer."""
    if name.startswith(HF_PREFIX):
        if not name[len(HF_PREFIX):]:
            raise UserError(f"tokenizer {name!r}: give the model folder after {HF_PREFIX}")
        return ModelTokenizer.KIND, name[len(HF_PREFIX):]
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
    raise UserError(f"unknown tokenizer {name!r}; use gpt2, bpe:<vocab size> (trained on the corpus), "
                    f"the path of a tokenizer.json or {HF_PREFIX}<a released model's folder>")


def load_tokenizer(spec: dict, folder: str | os.PathLike | None = None) -> Tokenizer:
    """Rebuild the tokenizer described by `spec` (as written by `Tokenizer.spec()`)."""
    kind = spec.get("kind")
    if kind == "tiktoken":
        return TiktokenTokenizer.from_name(spec["name"])
    if kind == "bpe":
        return BPETokenizer.from_file(Path(folder or ".") / spec["file"])
    if kind == ModelTokenizer.KIND:
        return ModelTokenizer.from_spec(spec, folder)
    raise UserError(f"unknown tokenizer spec {json.dumps(spec)}")
