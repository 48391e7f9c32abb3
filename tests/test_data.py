"""Data preparation (sources, shards, manifest, reuse) and the grain batch pipeline."""

import json
import os

import numpy as np
import pytest

from gpt2_jax import data
from gpt2_jax.data import corpus
from gpt2_jax.data.tokenizer import EOT_ID, get_tokenizer

EOT = "<|endoftext|>"


def _decode(tokens) -> str:
    return get_tokenizer().decode(np.asarray(tokens).tolist())


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _window_ids(batch, block_size):
    # With tokens = arange(N), a window's first input token is its start, so its id is start // block_size.
    return (batch["inputs"][:, 0] // block_size).tolist()


def _count_tokenize_calls(monkeypatch):
    calls = []
    original = corpus._tokenize_to_shards

    def counting(*args, **kwargs):
        calls.append(args[0].key)
        return original(*args, **kwargs)

    monkeypatch.setattr(corpus, "_tokenize_to_shards", counting)
    return calls


# --------------------------------------------------------------------------------------------------------
# The built-in corpus (tokenised once per session).


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    return data.prepare_corpus(data.BUILTIN_SHAKESPEARE, tmp_path_factory.mktemp("cache"))


def test_builtin_shakespeare_is_plain_text_plays(shakespeare):
    manifest = shakespeare.manifest
    assert manifest["source"] == "builtin:shakespeare"
    assert manifest["num_documents"] == len(data.shakespeare_files()) >= 30
    assert manifest["total_tokens"] == len(shakespeare.tokens) > 1_000_000
    assert manifest["tokenizer"]["vocab_bpe_sha256"] == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

    tokens = np.asarray(shakespeare.tokens)
    assert tokens[0] == EOT_ID  # every play is preceded by <|endoftext|>
    assert int((tokens == EOT_ID).sum()) == manifest["num_documents"]
    assert tokens.max() < EOT_ID + 1

    text = _decode(tokens)
    for markup in ("**", "_", "*", "\\", "#", "&amp;", "  \n"):
        assert markup not in text, f"markdown left over: {markup!r}"
    plays = text.split(EOT)[1:]
    assert all(play.strip() for play in plays)
    hamlet = next(p for p in plays if p.startswith("Hamlet"))
    assert "ACT III" in hamlet and "SCENE I." in hamlet
    assert "\nHAMLET:\nTo be, or not to be" in hamlet
    assert "[Aside]" in text  # escaped stage-direction brackets survive unescaped
    assert "\nEnter " in text and "\nExeunt" in text  # stage directions as plain lines


def test_builtin_shakespeare_is_reused(shakespeare, monkeypatch):
    calls = _count_tokenize_calls(monkeypatch)
    again = data.prepare_corpus(data.BUILTIN_SHAKESPEARE, shakespeare.path.parent)
    assert calls == []
    assert again.path == shakespeare.path
    assert again.manifest["total_tokens"] == shakespeare.manifest["total_tokens"]


def test_shakespeare_split_feeds_batches(shakespeare):
    train, val = shakespeare.split(0.1)
    assert len(train) + len(val) == len(shakespeare.tokens)
    assert len(val) == int(len(shakespeare.tokens) * 0.1)
    it = data.make_batch_iterator(val, block_size=64, global_batch_size=8, seed=0)
    batch = next(it)
    assert batch["inputs"].shape == (8, 64) and batch["inputs"].dtype == np.int32
    it.close()


# --------------------------------------------------------------------------------------------------------
# Streaming tokenisation.


def test_safe_pieces_keep_tokens_identical():
    enc = get_tokenizer()
    texts = [
        "It's a word-and-space world; they'll cut it, won't they?  Twice  spaced,\n\nnew lines\tand tabs.",
        "numbers 123 456 7890 and émigré naïve 日本 語 text 🙂 with emoji 🚀 here",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 20,
        "unbroken" * 300 + " tail",
    ]
    for text in texts:
        for target in (5, 16, 100):
            blocks = [text[i : i + 7] for i in range(0, len(text), 7)]
            pieces = list(corpus.safe_pieces(blocks, target))
            assert "".join(pieces) == text
            assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


# --------------------------------------------------------------------------------------------------------
# Text sources.


def test_txt_file_is_one_document(tmp_path):
    text = "First line of the only document.\nSecond line, with ünïcode and 🙂.\n"
    source = tmp_path / "doc.txt"
    source.write_text(text, encoding="utf-8")
    corpus = data.prepare_corpus(str(source), tmp_path / "cache")
    assert _decode(corpus.tokens) == EOT + text
    assert corpus.manifest["num_documents"] == 1
    assert corpus.path.parent == (tmp_path / "cache").resolve()
    assert corpus.path.name.startswith("doc.txt-")
    files = corpus.manifest["fingerprint"]["files"]
    assert files[0]["path"] == str(source) and files[0]["size"] == source.stat().st_size


def test_folder_documents_in_sorted_order(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.md").write_text("Second document.\n")
    (folder / "a.txt").write_text("First document.\n")
    (folder / "c.jsonl").write_text(json.dumps({"text": "Third."}) + "\n" + json.dumps({"text": "Fourth."}) + "\n")
    (folder / "notes.py").write_text("print('ignored')\n")
    corpus = data.prepare_corpus(str(folder), tmp_path / "cache")
    assert _decode(corpus.tokens) == f"{EOT}First document.\n{EOT}Second document.\n{EOT}Third.{EOT}Fourth."
    assert corpus.manifest["num_documents"] == 4
    assert [os.path.basename(f["path"]) for f in corpus.manifest["fingerprint"]["files"]] == [
        "a.txt",
        "b.md",
        "c.jsonl",
    ]


def test_jsonl_documents(tmp_path):
    source = tmp_path / "docs.jsonl"
    docs = ["alpha beta", "gamma\ndelta", "", "epsilon"]
    source.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    corpus = data.prepare_corpus(str(source), tmp_path / "cache")
    # Empty documents are skipped: no lone separators.
    assert _decode(corpus.tokens) == f"{EOT}alpha beta{EOT}gamma\ndelta{EOT}epsilon"
    assert corpus.manifest["num_documents"] == 3


def test_jsonl_errors_name_the_line(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
        data.prepare_corpus(str(source), tmp_path / "cache")


def test_a_non_utf8_file_is_named_with_the_byte_its_offset_and_how_to_convert_it(tmp_path):
    # Windows-1252 text whose first non-UTF-8 byte (the "é" of café, 0xe9) is far past the first block read.
    source = tmp_path / "notes 1252.txt"
    text = "plain ascii line\n" * 5000 + "un café\n"
    source.write_bytes(text.encode("cp1252"))
    at = text.index("é")
    with pytest.raises(ValueError) as error:
        data.prepare_corpus(str(source), tmp_path / "cache")
    assert str(error.value) == (
        f"{source} is not UTF-8 text: byte 0xe9 at offset {at} (line 5001) is not valid UTF-8; it may be Windows-1252 "
        f"/ Latin-1: convert it with iconv -f WINDOWS-1252 -t UTF-8 '{source}' > '{source}.utf8' and use that file"
    )
    # A UTF-16 file (with its byte-order mark) is told apart; .jsonl files get the same line.
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes(json.dumps({"text": "hi"}).encode("utf-16"))
    with pytest.raises(ValueError, match=r"u16\.jsonl is not UTF-8 text: byte 0xff at offset 0 \(line 1\) .* UTF-16 "
                                         r"byte-order mark: convert it with iconv -f UTF-16 -t UTF-8 "):
        data.prepare_corpus(str(utf16), tmp_path / "cache")


def test_many_shards_concatenate(tmp_path):
    source = tmp_path / "long.txt"
    source.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    one = data.prepare_corpus(str(source), tmp_path / "cache_one")
    many = data.prepare_corpus(str(source), tmp_path / "cache_many", shard_size=37)
    assert len(many.manifest["shards"]) > 5
    assert many.tokens.num_parts == len(many.manifest["shards"])
    np.testing.assert_array_equal(np.asarray(many.tokens), np.asarray(one.tokens))
    for shard in many.manifest["shards"]:
        path = many.path / shard["file"]
        assert len(data.read_llmc_shard(path)) == shard["tokens"] <= 37
        assert corpus._sha256_file(path) == shard["sha256"]
    assert sum(s["tokens"] for s in many.manifest["shards"]) == many.manifest["total_tokens"]
    assert json.loads((many.path / "manifest.json").read_text()) == many.manifest


def test_changed_source_is_retokenised_unchanged_is_reused(tmp_path, monkeypatch):
    source = tmp_path / "doc.txt"
    source.write_text("Original words here.\n")
    cache = tmp_path / "cache"
    calls = _count_tokenize_calls(monkeypatch)

    first = data.prepare_corpus(str(source), cache)
    assert len(calls) == 1
    # Same bytes, new mtime (e.g. copied again): hashed, found equal, reused; the new mtime is remembered.
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    again = data.prepare_corpus(str(source), cache)
    assert len(calls) == 1
    assert again.path == first.path
    assert again.manifest["fingerprint"]["files"][0]["mtime_ns"] == source.stat().st_mtime_ns

    # Different bytes of the same size: detected by the content hash, re-tokenised.
    source.write_text("Changed words here.\n".ljust(len("Original words here.\n")))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 2 * 10**9))
    changed = data.prepare_corpus(str(source), cache)
    assert len(calls) == 2
    assert _decode(changed.tokens).startswith(EOT + "Changed words")
    assert changed.manifest["fingerprint"]["files"][0]["sha256"] != first.manifest["fingerprint"]["files"][0]["sha256"]


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    source = tmp_path / "doc.txt"
    source.write_text("Some words to cache.\n")
    corpus = data.prepare_corpus(str(source), tmp_path / "cache")
    (corpus.path / corpus.manifest["shards"][0]["file"]).write_bytes(b"garbage")
    calls = _count_tokenize_calls(monkeypatch)
    rebuilt = data.prepare_corpus(str(source), tmp_path / "cache")
    assert len(calls) == 1
    assert _decode(rebuilt.tokens) == EOT + "Some words to cache.\n"


def test_empty_corpus_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt.*0 tokens"):
        data.prepare_corpus(str(empty), tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written left behind


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.prepare_corpus(str(tmp_path / "nope.txt"), tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.check_source(str(tmp_path / "nope.txt"))  # the same check, without preparing anything
    with pytest.raises(ValueError, match="builtin:poetry"):
        data.prepare_corpus("builtin:poetry", tmp_path / "cache")
    data.check_source("builtin:shakespeare")
    assert not (tmp_path / "cache").exists()


def test_first_line_is_the_first_non_blank_line_of_the_first_document():
    enc = get_tokenizer()
    stream = [EOT_ID] + enc.encode("\n\n  \nThe Tempest\nACT I\n") + [EOT_ID] + enc.encode("Other")
    assert _decode(data.first_line(stream)) == "The Tempest\n"
    long = enc.encode(" ".join(["word"] * 40))  # one long line: its first tokens
    assert data.first_line(long, max_tokens=5) == long[:5]
    assert data.first_line([EOT_ID, EOT_ID]) == [EOT_ID]


# --------------------------------------------------------------------------------------------------------
# llm.c shards.


def test_llmc_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 1234], dtype=np.uint16)
    path = tmp_path / "shard.bin"
    data.write_llmc_shard(path, tokens)
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, len(tokens)]
    read = data.read_llmc_shard(path)
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, tokens)


def _corrupt(path, *, magic=None, version=None, count=None, extra=b"", cut=0):
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(bytes(raw[:12]), dtype="<i4").copy()
    for i, value in enumerate((magic, version, count)):
        if value is not None:
            header[i] = value
    raw[:12] = header.tobytes()
    path.write_bytes(bytes(raw[: len(raw) - cut]) + extra)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(magic=20240521), "wrong magic number 20240521"),
        (dict(version=2), "unsupported llm.c shard version 2"),
        (dict(cut=2), r"header says 100 tokens .* body holds 198 bytes \(truncated\)"),
        (dict(extra=b"\0\0"), r"body holds 202 bytes \(trailing data\)"),
        (dict(count=101), r"header says 101 tokens"),
    ],
)
def test_bad_llmc_shards_are_rejected(tmp_path, change, message):
    path = tmp_path / "bad_shard.bin"
    data.write_llmc_shard(path, np.arange(100))
    _corrupt(path, **change)
    with pytest.raises(ValueError, match=message) as err:
        data.read_llmc_shard(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match=message):
        data.prepare_corpus(str(path), tmp_path / "cache")


def test_short_llmc_file_is_rejected(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"tiny\.bin: 100 bytes is too short"):
        data.read_llmc_shard(path)


def test_llmc_sources_are_read_as_they_are(tmp_path, monkeypatch):
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 50257, size=n, dtype=np.uint16) for n in (300, 1, 257)]
    for i, part in enumerate(parts):
        data.write_llmc_shard(folder / f"fineweb_train_{i:06d}.bin", part)
    data.write_llmc_shard(folder / "fineweb_val_000000.bin", parts[0][:10])
    calls = _count_tokenize_calls(monkeypatch)

    by_glob = data.prepare_corpus(str(folder / "fineweb_train_*.bin"), tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(by_glob.tokens), np.concatenate(parts))
    assert [s["tokens"] for s in by_glob.manifest["shards"]] == [300, 1, 257]
    assert not list(by_glob.path.glob("*.bin"))  # memory-mapped in place, not copied
    by_folder = data.prepare_corpus(str(folder), tmp_path / "cache")
    assert len(by_folder.tokens) == 300 + 1 + 257 + 10
    assert calls == []

    # A prepared cache folder is itself an llm.c source.
    text = tmp_path / "doc.txt"
    text.write_text("Hello world, hello shards.\n")
    prepared = data.prepare_corpus(str(text), tmp_path / "cache", shard_size=4)
    reread = data.prepare_corpus(str(prepared.path), tmp_path / "cache2")
    np.testing.assert_array_equal(np.asarray(reread.tokens), np.asarray(prepared.tokens))


# --------------------------------------------------------------------------------------------------------
# TokenArray and split.


def test_token_array_slices_like_numpy():
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 65535, size=n, dtype=np.uint16) for n in (5, 0, 3, 11, 1)]
    whole = np.concatenate(parts)
    tokens = data.TokenArray(parts)
    assert len(tokens) == len(whole) == 20
    for start, stop in [(0, 20), (3, 9), (5, 8), (8, 8), (19, 25), (-4, None), (0, -1)]:
        view = tokens[start:stop]
        assert isinstance(view, data.TokenArray)
        np.testing.assert_array_equal(np.asarray(view), whole[start:stop])
        np.testing.assert_array_equal(np.asarray(view[1:3]), whole[start:stop][1:3])
    assert [tokens[i] for i in (0, 7, 19, -1)] == [whole[i] for i in (0, 7, 19, -1)]
    with pytest.raises(IndexError):
        tokens[20]
    with pytest.raises(IndexError):
        tokens[::2]


def test_split_tokens_holds_out_the_tail():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = data.split_tokens(tokens, 0.1)
    np.testing.assert_array_equal(train, tokens[:900])
    np.testing.assert_array_equal(val, tokens[900:])
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_tokens(tokens, 1.0)


# --------------------------------------------------------------------------------------------------------
# Batches.

BLOCK = 4


def _tokens(num_windows, block_size=BLOCK):
    # Token value == position: every window is identifiable from its first input token.
    return np.arange(num_windows * block_size + 1, dtype=np.uint16)


def _iterator(tokens, **kwargs):
    kwargs = {"block_size": BLOCK, "global_batch_size": 8, "seed": 0, "prefetch_batches": 0, **kwargs}
    return data.make_batch_iterator(tokens, **kwargs)


def test_batch_shapes_and_shifted_targets():
    it = _iterator(_tokens(50), global_batch_size=6, process_count=2, prefetch_batches=2)
    for batch in _take(it, 20):
        assert set(batch) == {"inputs", "targets"}
        assert batch["inputs"].shape == batch["targets"].shape == (3, BLOCK)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)  # tokens are positions
        assert (batch["inputs"][:, 0] % BLOCK == 0).all()  # windows start at multiples of block_size
    it.close()


def test_same_seed_same_order_other_seed_other_order():
    tokens = _tokens(64)
    a = [_window_ids(b, BLOCK) for b in _take(_iterator(tokens, seed=7), 16)]
    b = [_window_ids(b, BLOCK) for b in _take(_iterator(tokens, seed=7), 16)]
    c = [_window_ids(b, BLOCK) for b in _take(_iterator(tokens, seed=8), 16)]
    assert a == b
    assert a != c


def test_each_window_once_per_epoch_fresh_order_each_epoch():
    num_windows, gb = 43, 8  # 5 full batches per epoch; the 3 windows of the partial batch are dropped
    it = _iterator(_tokens(num_windows), global_batch_size=gb, num_epochs=3)
    assert it.steps_per_epoch == 5 and it.num_steps == 15
    epochs = []
    for epoch in range(3):
        assert it.epoch == epoch and it.step == epoch * 5
        ids = [w for b in _take(it, 5) for w in _window_ids(b, BLOCK)]
        assert len(ids) == len(set(ids)) == 40
        assert set(ids) <= set(range(num_windows))
        epochs.append(ids)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    with pytest.raises(StopIteration):
        next(it)


def test_runs_forever_without_num_epochs():
    it = _iterator(_tokens(8), global_batch_size=8)
    assert it.num_steps is None
    batches = _take(it, 7)
    assert all(sorted(_window_ids(b, BLOCK)) == list(range(8)) for b in batches)
    assert it.epoch == 7


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_partition_the_global_batch(process_count):
    tokens = _tokens(37)
    steps = 10  # crosses epoch boundaries (4 steps per epoch)
    reference = _take(_iterator(tokens), steps)
    shares = [
        _take(_iterator(tokens, process_index=p, process_count=process_count), steps) for p in range(process_count)
    ]
    for s in range(steps):
        rows = [_window_ids(shares[p][s], BLOCK) for p in range(process_count)]
        assert all(len(r) == 8 // process_count for r in rows)
        flat = [w for r in rows for w in r]
        assert len(set(flat)) == len(flat)  # disjoint
        assert flat == _window_ids(reference[s], BLOCK)  # concatenated in process order == the global batch
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([shares[p][s][key] for p in range(process_count)]), reference[s][key])


class _RecordingTokens:
    """A token array that records which ranges are read."""

    def __init__(self, tokens):
        self._tokens = tokens
        self.reads = []

    def __len__(self):
        return len(self._tokens)

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self._tokens[key]


def test_a_process_reads_only_its_own_windows():
    tokens = _RecordingTokens(_tokens(40))
    it = _iterator(tokens, process_index=1, process_count=4)
    batches = _take(it, 6)
    read_windows = sorted(start // BLOCK for start, _ in tokens.reads)
    assert read_windows == sorted(w for b in batches for w in _window_ids(b, BLOCK))
    assert all(stop - start == BLOCK + 1 for start, stop in tokens.reads)


def test_token_array_input_matches_numpy_input():
    tokens = _tokens(30)
    parts = data.TokenArray([tokens[:7], tokens[7:50], tokens[50:]])
    for x, y in zip(_take(_iterator(tokens), 5), _take(_iterator(parts), 5)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


@pytest.mark.parametrize("saved_at", [3, 5, 9])  # mid-epoch, exactly at the boundary, in the next epoch
def test_restore_state_continues_identically(saved_at):
    tokens = _tokens(42)  # 5 steps per epoch
    it = _iterator(tokens, prefetch_batches=2)
    _take(it, saved_at)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == saved_at
    expected = _take(it, 8)

    restored = _iterator(tokens, prefetch_batches=2)
    _take(restored, 1)  # a state is set over whatever the iterator did before
    restored.set_state(state)
    assert restored.step == saved_at and restored.epoch == saved_at // 5
    for x, y in zip(expected, _take(restored, 8)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    # The state is the global step: a different process count resumes the same global batches.
    half = _iterator(tokens, process_index=1, process_count=2)
    half.set_state(state)
    np.testing.assert_array_equal(next(half)["inputs"], expected[0]["inputs"][4:])
    it.close()
    restored.close()


def test_state_from_another_setup_is_refused():
    state = _iterator(_tokens(40)).get_state()
    with pytest.raises(ValueError, match="global_batch_size=8 but this iterator has global_batch_size=4"):
        _iterator(_tokens(40), global_batch_size=4).set_state(state)
    with pytest.raises(ValueError, match="num_windows"):
        _iterator(_tokens(41)).set_state(state)


@pytest.mark.parametrize("saved_at,old,new", [(3, 4, 8), (4, 4, 8), (3, 8, 4), (4, 8, 12), (11, 4, 12)],
                         ids=["grow", "grow-aligned", "shrink", "grow-odd", "into-next-epoch"])
def test_a_state_carries_over_to_another_batch_size(saved_at, old, new):
    tokens = _tokens(50)
    # Each epoch's window order, the same for any batch size (a batch of 50 is a whole epoch).
    order = [_window_ids(batch, BLOCK) for batch in _take(_iterator(tokens, global_batch_size=50), 3)]
    it = _iterator(tokens, global_batch_size=old)
    _take(it, saved_at)
    epoch, seen = divmod(saved_at, 50 // old)
    seen *= old  # windows of this epoch already trained on
    state = data.rebatch_state(it.get_state(), new)
    new_epoch, start = divmod(state["step"], 50 // new)
    start *= new
    if new_epoch == epoch:  # the first batch holding no window seen: fewer than `new` skipped
        assert seen <= start < seen + new
    else:  # what is left of the epoch holds no whole new batch
        assert (new_epoch, start) == (epoch + 1, 0) and seen + new > 50 // new * new
    resumed = _iterator(tokens, global_batch_size=new)
    resumed.set_state(state)
    assert _window_ids(next(resumed), BLOCK) == order[new_epoch][start : start + new]


def test_grain_checkpoint_handler_round_trip(tmp_path):
    import grain
    from etils import epath

    it = _iterator(_tokens(40))
    _take(it, 3)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
    restored = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=_iterator(_tokens(40)))
    np.testing.assert_array_equal(next(restored)["inputs"], next(it)["inputs"])


def test_batch_errors_give_the_numbers():
    with pytest.raises(ValueError, match=r"of 4 tokens is shorter than one window of block_size\+1=5"):
        _iterator(np.arange(4, dtype=np.uint16))
    with pytest.raises(
        ValueError, match=r"corpus of 29 tokens gives 7 windows of block_size\+1=5, fewer than global_batch_size=8"
    ):
        _iterator(np.arange(29, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"global_batch_size=8 is not divisible by process_count=3"):
        _iterator(_tokens(40), process_count=3)
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        _iterator(_tokens(40), block_size=0)
    with pytest.raises(ValueError, match="val of 10 tokens"):
        data.check_enough_tokens(np.arange(10), 16, 1, "val")
    assert data.check_enough_tokens(np.arange(33), 4, 8) == 8
