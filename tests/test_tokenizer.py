"""The offline GPT-2 tokenizer: known ids, round trips, parity with Hugging Face, hash verification."""

import hashlib
import shutil

import pytest

from gpt2_jax.data import tokenizer as tok

# Varied texts for parity: contractions, digits, punctuation runs, odd whitespace, unicode, emoji, code.
PARITY_TEXTS = [
    "Hello world",
    "To be, or not to be, that is the question:",
    "I'm sure they'll say we've done it; she'd've known.",
    "Numbers: 3.14159, 1,000,000 and 2024-05-20T12:00:00Z.",
    "trailing spaces   \n\n\n  leading spaces\ttabs\t\there\r\nwindows line",
    "    def f(x):\n        return x ** 2  # square\n",
    "Ünïcödé façade — naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어.",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷, zero\u200bwidth",
    "!!!???...,,,;;;::: ((([[[{{{}}}]]])))",
    "   ",
    "\n",
    "",
    "x" * 300 + " " + "ab" * 100,
]


def test_hello_world_ids():
    enc = tok.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == tok.N_VOCAB == 50257
    assert enc.eot_token == tok.EOT_ID == 50256
    assert enc.name == "gpt2"


def test_cached_instance():
    assert tok.get_tokenizer() is tok.get_tokenizer()


def test_pattern_matches_tiktoken_gpt2():
    # Importing the pattern constant touches no network; calling openai_public.gpt2() would.
    from tiktoken_ext import openai_public

    assert openai_public.r50k_pat_str == tok.GPT2_PAT_STR


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii text.",
        "Ünïcödé façade — naïve café, 日本語, русский",
        "emoji 🙂🚀👩‍👩‍👧🇫🇷",
        " \t\n\n   \r\n  spaced \u00a0 out\t\t\n",
    ],
)
def test_round_trip(text):
    enc = tok.get_tokenizer()
    ids = enc.encode_ordinary(text)
    assert all(0 <= i < tok.EOT_ID for i in ids)
    assert enc.decode(ids) == text


def test_special_token_round_trip():
    enc = tok.get_tokenizer()
    text = "first doc<|endoftext|>second doc"
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(tok.EOT_ID) == 1
    assert enc.decode(ids) == text
    # Without allowing it, tiktoken refuses the special token rather than silently splitting it.
    with pytest.raises(ValueError):
        enc.encode(text)
    # encode_ordinary treats it as plain text: several ordinary tokens, no EOT id.
    assert tok.EOT_ID not in enc.encode_ordinary(text)


def _hf_tokenizer(tmp_path):
    from transformers import GPT2TokenizerFast

    vocab_bpe, encoder_json = tok.bpe_file_paths()
    folder = tmp_path / "hf_gpt2_tokenizer"
    folder.mkdir()
    shutil.copy(encoder_json, folder / "vocab.json")
    shutil.copy(vocab_bpe, folder / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(folder))


def test_ids_match_hugging_face(tmp_path):
    hf = _hf_tokenizer(tmp_path)
    enc = tok.get_tokenizer()
    # Guard against transformers building an empty vocabulary (then every text encodes to []).
    assert hf("Hello world")["input_ids"] == [15496, 995]
    for text in PARITY_TEXTS:
        expected = hf(text)["input_ids"]
        if text:
            assert expected, f"Hugging Face gave an empty encoding for {text!r}"
        assert enc.encode_ordinary(text) == expected, text
    assert hf.convert_tokens_to_ids("<|endoftext|>") == tok.EOT_ID


def test_package_files_have_pinned_hashes():
    vocab_bpe, encoder_json = tok.bpe_file_paths()
    assert vocab_bpe.name == "vocab.bpe" and encoder_json.name == "encoder.json"
    tok._read_verified(vocab_bpe, tok.VOCAB_BPE_SHA256)
    tok._read_verified(encoder_json, tok.ENCODER_JSON_SHA256)


def test_encoder_ids_are_the_merge_ranks():
    vocab_bpe, encoder_json = (path.read_bytes() for path in tok.bpe_file_paths())
    ranks = tok._ranks_from_encoder(encoder_json)  # what get_tokenizer uses
    assert len(ranks) == tok.EOT_ID and ranks == tok._mergeable_ranks(vocab_bpe, encoder_json)


def test_corrupted_file_is_rejected(tmp_path):
    vocab_bpe, encoder_json = tok.bpe_file_paths()
    bad_vocab = tmp_path / "vocab.bpe"
    data = bytearray(vocab_bpe.read_bytes())
    data[-2] ^= 1  # flip one bit in the last merge
    bad_vocab.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        tok._build_encoding(bad_vocab, encoder_json)
    message = str(err.value)
    assert str(bad_vocab) in message
    assert tok.VOCAB_BPE_SHA256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message


def test_missing_file_is_rejected(tmp_path):
    vocab_bpe, _ = tok.bpe_file_paths()
    missing = tmp_path / "encoder.json"
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        tok._build_encoding(vocab_bpe, missing)
