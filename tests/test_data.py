"""Tests of data/: shard format, tokenizers, loader, synthetic generator and prepare.py.
CPU-only, no network (fineweb runs against a local HTTP server), files only under tmp_path."""
import base64
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from data import prepare
from data.shards import (HEADER_BYTES, ShardWriter, TokenLoader, load_tokens, read_header, read_meta,
                         tokenizer_from_meta, write_meta, write_shard)
from data.synthetic import PASSKEY_FILLER, PASSKEY_PREFIX, generate_documents, text_of
from data.tokenizer import get_tokenizer


def run_script(*args):
    """Run data/prepare.py in a subprocess, as a user would."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def split_tokens(folder, split):
    files = sorted(f for f in os.listdir(folder) if f.startswith(split + "_"))
    return np.concatenate([load_tokens(os.path.join(folder, f)) for f in files])

# -----------------------------------------------------------------------------
# shards


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 256, 50256, 65535], dtype=np.int64)
    path = str(tmp_path / "a.bin")
    write_shard(path, tokens)
    assert read_header(path) == 5
    assert os.path.getsize(path) == HEADER_BYTES + 2 * 5
    np.testing.assert_array_equal(load_tokens(path), tokens)
    write_shard(path, [])
    assert read_header(path) == 0 and len(load_tokens(path)) == 0
    with pytest.raises(ValueError, match="uint16"):
        write_shard(path, [65536])


def test_shard_writer_splits(tmp_path):
    writer = ShardWriter(str(tmp_path), "train", shard_size=10)
    tokens = np.arange(35)
    for chunk in np.split(tokens, [3, 4, 17, 30]):
        writer.add(chunk)
    files = writer.close()
    assert [os.path.basename(f) for f in files] == [f"train_{i:06d}.bin" for i in range(4)]
    assert [read_header(f) for f in files] == [10, 10, 10, 5]
    np.testing.assert_array_equal(split_tokens(str(tmp_path), "train"), tokens)
    assert writer.n_tokens == 35


def test_bad_shards(tmp_path):
    path = str(tmp_path / "bad.bin")
    write_shard(path, np.arange(100))
    raw = bytearray(open(path, "rb").read())
    open(path, "wb").write(b"\0\0\0\0" + raw[4:])  # wrong magic
    with pytest.raises(ValueError, match=r"not a token shard \(bad magic.*prepare\.py"):
        read_header(path)
    open(path, "wb").write(raw[:-10])  # truncated
    with pytest.raises(ValueError, match="truncated.*prepare.py"):
        load_tokens(path)
    open(path, "wb").write(raw[:10])  # shorter than a header
    with pytest.raises(ValueError, match="not a token shard"):
        read_header(path)

# -----------------------------------------------------------------------------
# tokenizers and meta.json


def test_bytes_tokenizer():
    enc = get_tokenizer("bytes")
    text = "Hello, wörld ✓ 123"
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8")) and enc.decode(ids) == text
    assert enc.eot_token == 256 and enc.n_vocab == 257
    assert enc.encode_ordinary("<|endoftext|>") == list(b"<|endoftext|>")  # text is never a special token
    with pytest.raises(ValueError, match="bytes, gpt2"):
        get_tokenizer("nope")


def write_tiny_ranks(path):
    """A tiny GPT-2-style ranks file: the 256 bytes plus the merge "ab" -> 256."""
    ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256}
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return str(path)


def test_gpt2_from_ranks_file(tmp_path):
    enc = get_tokenizer("gpt2", write_tiny_ranks(tmp_path / "tiny.tiktoken"))
    assert enc.encode_ordinary("abc") == [256, ord("c")]
    assert enc.decode([256, 99]) == "abc" and enc.eot_token == 50256
    with pytest.raises(ValueError, match="not found"):
        get_tokenizer("gpt2", str(tmp_path / "missing.tiktoken"))


def test_meta(tmp_path):
    write_meta(str(tmp_path), tokenizer="bytes", vocab_size=257, eot_token=256)
    meta = read_meta(str(tmp_path))
    assert meta["vocab_size"] == 257 and tokenizer_from_meta(meta).eot_token == 256
    with pytest.raises(FileNotFoundError, match=r"python data/prepare\.py"):
        read_meta(str(tmp_path / "nothing"))

# -----------------------------------------------------------------------------
# loader


@pytest.fixture
def shard_folder(tmp_path):
    """Tokens 0..99 as three train shards of 40, 35 and 25 tokens."""
    for i, (a, b) in enumerate([(0, 40), (40, 75), (75, 100)]):
        write_shard(str(tmp_path / f"train_{i:06d}.bin"), np.arange(a, b))
    return str(tmp_path)


def test_loader_walk_and_wrap(shard_folder):
    loader = TokenLoader(shard_folder, "train", batch_size=2, block_size=5)  # 11 tokens a batch
    starts = []
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (2, 5) and x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x.ravel(), x[0, 0] + np.arange(10))  # one contiguous window
        np.testing.assert_array_equal(y, x + 1)  # targets are inputs shifted by one
        starts.append(int(x[0, 0]))
    # a shard's tail shorter than 11 tokens is skipped; after the last shard, back to the first
    assert starts == [0, 10, 20, 40, 50, 60, 75, 85, 0, 10]
    loader.reset()
    assert loader.next_batch()[0][0, 0] == 0


def test_loader_resume(shard_folder):
    loader = TokenLoader(shard_folder, "train", 2, 5)
    for n in range(9):  # resume from every position, including across shards and the wrap
        state = loader.state_dict()
        expected = loader.next_batch()
        resumed = TokenLoader(shard_folder, "train", 2, 5)
        resumed.load_state_dict(state)
        got = resumed.next_batch()
        np.testing.assert_array_equal(got[0], expected[0])
        assert resumed.state_dict() == loader.state_dict()


def test_loader_errors(shard_folder):
    with pytest.raises(FileNotFoundError, match=r"no val_\*\.bin in .*python data/prepare\.py"):
        TokenLoader(shard_folder, "val", 2, 5)
    with pytest.raises(ValueError, match=r"has 40 tokens, need at least B\*T\+1 = 41; lower --batch-size"):
        TokenLoader(shard_folder, "train", 4, 10)
    open(os.path.join(shard_folder, "train_000001.bin"), "r+b").write(b"junk")
    with pytest.raises(ValueError, match="not a token shard"):
        TokenLoader(shard_folder, "train", 2, 5)

# -----------------------------------------------------------------------------
# synthetic documents


def test_synthetic_documents():
    docs = list(generate_documents(300, seed=0))
    assert docs == list(generate_documents(300, seed=0))
    assert docs != list(generate_documents(300, seed=1))
    for doc in docs:
        text = text_of(doc)
        key = re.fullmatch(r"(.*) The pass key is (\d+)\. Remember it\. \2 is the pass key\.(.*) "
                           r"What is the pass key\? The pass key is \2\.", text.replace(PASSKEY_PREFIX, "", 1))
        assert text.startswith(PASSKEY_PREFIX) and key, text
        assert [t for t, is_answer in doc if is_answer] == [key.group(2) + "."]  # only the final key is an answer
        filler = (key.group(1) + key.group(3)).split()
        assert " ".join(filler) in " ".join(PASSKEY_FILLER * 3)  # the eval's filler cycle, in order
    assert {len(re.search(r"is (\d+)\.", text_of(d)).group(1)) for d in docs} == {3, 4, 5, 6, 7}
    enc = get_tokenizer("words")
    lengths = [len(enc.encode_ordinary(text_of(d))) + 1 for d in docs]
    assert min(lengths) < 80 and max(lengths) <= 128  # every document fits a 128-token row


def test_words_tokenizer():
    enc = get_tokenizer("words")
    text = "The pass key is 40917. Remember it."
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and len(ids) == 4 + 5 + 1 + 3  # a token per word, digit and mark
    assert all(i > 256 for i in ids) and enc.eot_token == 256
    odd = "Zebra ✓ 12"  # unknown words fall back to bytes, and still round-trip
    assert enc.decode(enc.encode_ordinary(odd)) == odd and max(enc.encode_ordinary(odd)[:5]) < 256
    words = ["cat", "sat"]  # a dataset's recorded word list rebuilds the same ids
    assert get_tokenizer("words", words=words).encode_ordinary("cat sat") == [257, 260]

# -----------------------------------------------------------------------------
# prepare.py


def test_prepare_synthetic_idempotent(tmp_path):
    out = tmp_path / "syn"
    result = run_script("synthetic", "--docs", 20, "--val-docs", 3, "--out", out)
    assert result.returncode == 0, result.stderr
    meta = read_meta(str(out))
    assert meta["tokenizer"] == "words" and meta["train_tokens"] > 0 and meta["val_tokens"] > 0
    assert not os.path.exists(str(out) + ".partial")
    tokens = split_tokens(str(out), "val")
    text = tokenizer_from_meta(meta).decode(list(tokens))
    assert text.startswith("<|endoftext|>There is") and text.count("What is the pass key?") == 3
    mtime = os.path.getmtime(out / "train_000000.bin")
    again = run_script("synthetic", "--docs", 20, "--val-docs", 3, "--out", out)
    assert again.returncode == 0 and f"{out} is already prepared (use --force to rebuild)" in again.stdout
    assert os.path.getmtime(out / "train_000000.bin") == mtime
    assert prepare.main(["synthetic", "--docs", "20", "--val-docs", "3", "--seed", "2", "--out", str(out)]) == 0
    assert read_meta(str(out))["settings"]["seed"] == 2  # other settings: rebuilt


def test_prepare_text(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("first document")
    (tmp_path / "in" / "sub" / "b.md").write_text("second, naïve")
    (tmp_path / "in" / "skip.bin").write_text("not text")
    out = tmp_path / "text"
    assert prepare.main(["text", "--input", str(tmp_path / "in"), "--val-fraction", "0.5", "--out", str(out)]) == 0
    np.testing.assert_array_equal(split_tokens(str(out), "train"), [256, *b"first document"])
    np.testing.assert_array_equal(split_tokens(str(out), "val"), [256, *"second, naïve".encode()])
    ranks = write_tiny_ranks(tmp_path / "tiny.tiktoken")
    out2 = tmp_path / "text_gpt2"
    assert prepare.main(["text", "--input", str(tmp_path / "in" / "a.txt"), str(tmp_path / "in" / "sub"),
                         "--tokenizer", "gpt2", "--ranks-file", ranks, "--out", str(out2)]) == 0
    meta = read_meta(str(out2))
    assert meta["eot_token"] == 50256 and meta["ranks_file"] == ranks
    assert list(split_tokens(str(out2), "train")) == [50256] + tokenizer_from_meta(meta).encode_ordinary("first document")


def test_prepare_synthetic_packs_rows_and_masks_the_answers(tmp_path):
    out = tmp_path / "syn"
    assert prepare.main(["synthetic", "--docs", "40", "--val-docs", "2", "--out", str(out)]) == 0
    tokens = split_tokens(str(out), "train")
    mask = np.asarray(load_tokens(str(out / "loss_mask" / "train_000000.bin")))
    enc = tokenizer_from_meta(read_meta(str(out)))
    assert len(mask) == len(tokens) and set(mask.tolist()) == {0, 1}
    rows = tokens[:len(tokens) // 128 * 128].reshape(-1, 128)
    assert (rows[:, 0] == enc.eot_token).all()  # every 128-token row starts with a document
    counted = enc.decode(tokens[mask == 1].tolist()).split(".")[:-1]
    keys = re.findall(r"The pass key is (\d+)\. Remember", enc.decode(tokens.tolist()))
    assert [c.strip() for c in counted] == keys  # exactly the answered keys (and their full stops)
    loader = TokenLoader(str(out), "train", 2, 128)
    x, y = loader.next_batch()
    assert ((y != -1) == mask[1:257].reshape(2, 128).astype(bool)).all()  # targets outside the mask: -1
    plain = tmp_path / "plain"
    assert prepare.main(["synthetic", "--docs", "40", "--val-docs", "2", "--loss-on", "all", "--pack", "0",
                         "--out", str(plain)]) == 0
    assert not (plain / "loss_mask").exists() and (split_tokens(str(plain), "train") != enc.eot_token).sum() == \
        (tokens != enc.eot_token).sum()  # the same documents, without padding


def test_prepare_shakespeare(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    (tmp_path / "input.txt").write_text(text)
    out = tmp_path / "shk"
    assert prepare.main(["shakespeare", "--input", str(tmp_path / "input.txt"), "--out", str(out)]) == 0
    cut = int(len(text) * 0.9)
    np.testing.assert_array_equal(split_tokens(str(out), "train"), [256, *text[:cut].encode()])
    np.testing.assert_array_equal(split_tokens(str(out), "val"), [256, *text[cut:].encode()])


def test_prepare_errors(tmp_path, capsys):
    result = run_script("text", "--input", tmp_path / "missing.txt", "--out", tmp_path / "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --input {tmp_path / 'missing.txt'}: no such file or folder"
    (tmp_path / "empty").mkdir()
    assert prepare.main(["text", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "error: no .txt or .md files" in capsys.readouterr().err
    # the val file is empty: fails after tokenizing, and leaves no dataset behind
    (tmp_path / "empty" / "a.txt").write_text("some text")
    (tmp_path / "empty" / "b.txt").write_text("")
    assert prepare.main(["text", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "error: the val split got no text" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.partial")
    assert prepare.main(["text", "--input", str(tmp_path / "empty"), "--tokenizer", "gpt2",
                         "--ranks-file", str(tmp_path / "nope.tiktoken"), "--out", str(tmp_path / "x")]) == 2
    assert "nope.tiktoken not found" in capsys.readouterr().err
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    assert prepare.main(["synthetic", "--docs", "5", "--out", str(tmp_path / "precious")]) == 2
    assert "is not a prepared dataset" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").exists()

# -----------------------------------------------------------------------------
# fineweb against a local HTTP server


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server of `files` (path -> bytes) that honours Range requests; paths in
    `short` claim 100 more bytes than they send. Yields (base URL, files, short, log)."""
    files, short, log = {}, set(), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                return self.send_error(404)
            body, rng = files[self.path], self.headers.get("Range")
            log.append((self.path, rng))
            start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body) - start + (100 if self.path in short else 0)))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    monkeypatch.setenv("no_proxy", "*")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", files, short, log
    httpd.shutdown()
    httpd.server_close()


def shard_bytes(tmp_path, tokens):
    write_shard(str(tmp_path / "s.bin"), tokens)
    return (tmp_path / "s.bin").read_bytes()


def test_prepare_fineweb(tmp_path, server):
    url, files, short, log = server
    val, train = shard_bytes(tmp_path, np.arange(50)), shard_bytes(tmp_path, np.arange(1000, 1300))
    files["/fw/fineweb_val_000000.bin"], files["/fw/fineweb_train_000001.bin"] = val, train
    out = tmp_path / "fineweb"
    (tmp_path / "fineweb.partial").mkdir()  # an interrupted run left half of the train shard
    (tmp_path / "fineweb.partial" / "train_000001.bin.part").write_bytes(train[:300])
    assert prepare.main(["fineweb", "--base-url", url + "/fw", "--out", str(out)]) == 0
    assert ("/fw/fineweb_train_000001.bin", "bytes=300-") in log  # resumed with a Range request
    np.testing.assert_array_equal(split_tokens(str(out), "train"), np.arange(1000, 1300))
    meta = read_meta(str(out))
    assert meta["tokenizer"] == "gpt2" and meta["eot_token"] == 50256 and meta["train_tokens"] == 300
    loader = TokenLoader(str(out), "val", 2, 8)
    np.testing.assert_array_equal(loader.next_batch()[0].ravel(), np.arange(16))
    assert prepare.main(["fineweb", "--base-url", url + "/fw", "--out", str(out)]) == 0
    assert len(log) == 2  # already prepared: nothing downloaded


def test_prepare_fineweb_errors(tmp_path, server, capsys):
    url, files, short, log = server
    val = shard_bytes(tmp_path, np.arange(50))
    files["/trunc/fineweb_val_000000.bin"] = val[:-6]  # served whole, but not a whole shard
    files["/short/fineweb_val_000000.bin"] = val  # the connection ends before Content-Length
    short.add("/short/fineweb_val_000000.bin")
    out = str(tmp_path / "fw")
    assert prepare.main(["fineweb", "--base-url", url + "/trunc", "--out", out]) == 2
    assert "is not a valid token shard" in capsys.readouterr().err
    assert prepare.main(["fineweb", "--base-url", url + "/short", "--out", out]) == 2
    assert f"stopped at {len(val)} of {len(val) + 100} bytes; run again to resume" in capsys.readouterr().err
    assert prepare.main(["fineweb", "--base-url", url + "/missing", "--out", out]) == 2
    assert f"cannot download {url}/missing/fineweb_val_000000.bin (HTTP 404)" in capsys.readouterr().err
    assert prepare.main(["fineweb", "--base-url", "http://127.0.0.1:1", "--out", out]) == 2  # nothing listens
    err = capsys.readouterr().err
    assert "error: cannot download http://127.0.0.1:1/fineweb_val_000000.bin" in err and "--base-url" in err
    assert not os.path.exists(out)
