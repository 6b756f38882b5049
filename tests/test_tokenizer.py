import pytest

from core.files import UserError
from data.tokenizer import EOT, BPETokenizer, TiktokenTokenizer, load_tokenizer, parse_tokenizer_name, train_bpe

TEXTS = ["The capital of France is Paris.", "naïve café — Ünïcödé ✓", "日本語のテキスト",
         "emoji 🧪🔬 and tabs\tand\r\nCRLF", "  leading and trailing spaces  ", "", "a",
         f"a literal {EOT} inside a document"]
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital of France. " * 4,
          "Numbers: one two three four five six seven eight nine ten. " * 2] * 5


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 320)


def test_bpe_round_trips_any_text(bpe):
    for text in TEXTS:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert b"".join(bpe.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert bpe.encode("") == []


def test_special_ids_lie_outside_the_text_vocabulary(bpe):
    assert bpe.mask_id == bpe.n_vocab and bpe.pad_id == bpe.n_vocab + 1
    assert bpe.vocab_size % 64 == 0 and bpe.vocab_size >= bpe.n_vocab + 2
    assert bpe.bos_id == bpe.eos_id < bpe.n_vocab
    ids = [i for t in TEXTS for i in bpe.encode(t)]
    assert max(ids) < bpe.n_vocab
    # a literal "<|endoftext|>" in a document is text, not a document boundary
    assert bpe.bos_id not in bpe.encode(TEXTS[-1])


def test_decode_shows_masks_and_hides_padding(bpe):
    ids = bpe.encode("Paris is")
    assert bpe.decode([*ids, bpe.mask_id, bpe.pad_id, bpe.pad_id]) == "Paris is_"
    assert bpe.decode([bpe.mask_id] * 3, mask_text="[M]") == "[M][M][M]"


def test_saved_bpe_reloads_identically(bpe, tmp_path):
    bpe.save(tmp_path)
    again = load_tokenizer(bpe.spec(), tmp_path)
    assert isinstance(again, BPETokenizer)
    assert again.spec() == bpe.spec() and again.n_vocab == bpe.n_vocab and again.bos_id == bpe.bos_id
    for text in TEXTS + CORPUS:
        assert again.encode(text) == bpe.encode(text)


def test_bpe_training_is_deterministic():
    a, b = train_bpe(CORPUS, 300), train_bpe(CORPUS, 300)
    assert a.tok.to_str() == b.tok.to_str()


def _tiny_tiktoken():
    """A real tiktoken Encoding with a byte alphabet and two merges (gpt2's needs a download)."""
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"th"] = 256
    ranks[b"the"] = 257
    return tiktoken.Encoding("tiny", pat_str=r"""'s|'t| ?\w+| ?[^\s\w]+|\s+""", mergeable_ranks=ranks,
                             special_tokens={EOT: 258})


def test_tiktoken_wrapper():
    tok = TiktokenTokenizer(_tiny_tiktoken())
    assert tok.n_vocab == 259 and tok.bos_id == 258 and tok.mask_id == 259 and tok.vocab_size == 320
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    assert 257 in tok.encode("the") and tok.bos_id not in tok.encode(TEXTS[-1])


def test_gpt2_offline_is_one_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="offline"):
        TiktokenTokenizer.from_name("gpt2")


def test_gpt2_when_reachable():
    try:
        tok = TiktokenTokenizer.from_name("gpt2")
    except UserError:
        pytest.skip("the gpt2 encoding is not cached and cannot be downloaded here")
    assert (tok.n_vocab, tok.bos_id, tok.mask_id, tok.pad_id, tok.vocab_size) == (50257, 50256, 50257, 50258, 50304)
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


@pytest.mark.parametrize("name", ["gpt3", "bpe:lots", "sentencepiece"])
def test_unknown_tokenizer_names(name):
    with pytest.raises(UserError):
        parse_tokenizer_name(name)


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="does not exist"):
        BPETokenizer.from_file(tmp_path / "missing.json")
