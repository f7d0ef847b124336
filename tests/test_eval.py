"""Tests of eval_extrapolate.py: prompts, scoring, engines at length, memory, errors, loss task.
CPU-only, no network, files only under tmp_path."""
import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import eval_extrapolate as E
from common.checkpoint import save_checkpoint
from data import retrieval as R
from data.shards import write_meta, write_shard
from data.tokenizer import get_tokenizer
from engines import memory as M
from model import GPT, GPTConfig

ENC = get_tokenizer("bytes")  # one token per byte: token positions are character positions (+1 for the EOT)
# the passkey prompt of Mohtashami & Jaggi (2023) as BAM's evaluator writes it, verbatim
PAPERS_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize them. I will quiz you about the important information there.")
PAPERS_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
UNIT = len(" " + PAPERS_FILLER)  # tokens per filler unit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: two busy threads on a loaded 2-core machine slowed these tests 20-50x
    (OpenMP workers waiting on each other); one thread keeps the file's time predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(attention="bam", **overrides):
    torch.manual_seed(0)
    config = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=320, block_size=128, attention=attention)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


def save_tiny(path, model=None, **checkpoint):
    model = model or tiny_model()
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "meta": {"tokenizer": "bytes", "vocab_size": 257, "eot_token": 256}, "step": 0, **checkpoint},
                    str(path))
    return str(path)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval_extrapolate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)

# -----------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("length", [400, 1000, 1001, 5000])
@pytest.mark.parametrize("depth", [0, 0.5, 1])
def test_passkey_prompt_is_the_papers_text(length, depth):
    sample = R.passkey_sample(ENC, length, depth, 5, random.Random(length))
    tokens, key = sample["tokens"], sample["keys"][0]
    n_input = len(tokens) - 1  # the last answer token is a target only
    assert length - UNIT < n_input <= length
    n_units = ENC.decode(tokens.tolist()).count(PAPERS_FILLER)
    assert len(key) == 5 and key[0] != "0"
    units = [PAPERS_FILLER] * n_units
    units.insert(round(depth * n_units), f"The pass key is {key}. Remember it. {key} is the pass key.")
    expected = " ".join([PAPERS_PREFIX, *units, "What is the pass key? The pass key is", key])
    assert tokens[0] == ENC.eot_token
    assert ENC.decode(tokens[1:].tolist()) == expected
    assert sample["answers"] == [(len(tokens) - 6, len(tokens))]  # " " + 5 digits


def test_needle_position_at_depth():
    head = 1 + len(PAPERS_PREFIX)
    question = len(" What is the pass key? The pass key is")
    needle = len(" The pass key is 12345. Remember it. 12345 is the pass key.")
    at = {d: R.passkey_sample(ENC, 2000, d, 5, random.Random(0)) for d in (0, 0.5, 1)}
    n_units = (len(at[0]["tokens"]) - head - needle - question - 6) // UNIT
    assert at[0]["needle_at"] == [head]  # right after the prefix: farthest from the question
    assert at[1]["needle_at"] == [head + n_units * UNIT]  # right before the question
    assert at[1]["needle_at"][0] + needle == len(at[1]["tokens"]) - 6 - question
    assert at[0.5]["needle_at"] == [head + round(n_units / 2) * UNIT]  # middle unit boundary


def test_niah_prompt():
    sample = R.niah_sample(ENC, 3000, 0.25, 3, None, random.Random(0))
    text = ENC.decode(sample["tokens"][1:].tolist())
    assert sample["needle_depths"] == [0.25, 0.25 + 1 / 3, 0.25 + 2 / 3]
    assert len(set(sample["cities"])) == 3 and all(len(n) == 7 for n in sample["keys"])
    for (a, b), city, number, at in zip(sample["answers"], sample["cities"], sample["keys"], sample["needle_at"]):
        assert ENC.decode(sample["tokens"][a:b].tolist()) == " " + number
        needle = f" The special magic {city} number is {number}."
        assert ENC.decode(sample["tokens"][at:at + len(needle)].tolist()) == needle
        assert f"What is the special magic {city} number? The special magic {city} number is {number}" in text
    assert np.diff(sample["needle_at"]).min() > 0  # evenly spread, in depth order here
    assert len(sample["tokens"]) - 1 <= 3000


def test_niah_haystack_file_is_cut_at_token_level():
    haystack = np.array(ENC.encode_ordinary("abcdefghij" * 100), dtype=np.int64)
    sample = R.niah_sample(ENC, 900, 0.0, 2, haystack, random.Random(0))
    assert len(sample["tokens"]) - 1 == 900  # single-token units: the length is exact
    with pytest.raises(ValueError, match="haystack file has 1000 tokens"):
        R.niah_sample(ENC, 5000, 0.0, 2, haystack, random.Random(0))

# -----------------------------------------------------------------------------
# scoring


class Oracle(nn.Module):
    """Knows the sample: huge logits for the true next token at the listed positions
    (or, with only_first, for the first answer's positions only)."""

    def __init__(self, sample, only_first=False):
        super().__init__()
        self.tokens = torch.from_numpy(sample["tokens"])
        a, b = sample["answers"][0]
        self.known = range(a - 1, b - 1) if only_first else range(len(self.tokens))

    def forward(self, idx, logits_at):
        logits = torch.zeros(idx.shape[0], len(logits_at), 320)
        for i, p in enumerate(logits_at.tolist()):
            if p in self.known:
                logits[:, i, self.tokens[p + 1]] = 100.0
        return logits, None


class Uniform(nn.Module):
    def forward(self, idx, logits_at):
        return torch.zeros(idx.shape[0], len(logits_at), 320), None


def test_oracle_scores_all_and_uniform_none():
    for depth in (0, 0.5, 1):
        sample = R.passkey_sample(ENC, 1500, depth, 5, random.Random(7))
        assert all(r["correct"] for r in R.judge(R.answer_logits(Oracle(sample), sample), sample, ENC))
        [wrong] = R.judge(R.answer_logits(Uniform(), sample), sample, ENC)
        assert not wrong["correct"] and wrong["predicted"] == "\x00" * 6  # argmax ties pick id 0
    sample = R.niah_sample(ENC, 1500, 0.5, 3, None, random.Random(7))
    assert [r["correct"] for r in R.judge(R.answer_logits(Oracle(sample), sample), sample, ENC)] == [True] * 3
    assert [r["correct"] for r in R.judge(R.answer_logits(Uniform(), sample), sample, ENC)] == [False] * 3
    # each needle is scored on its own
    partial = R.judge(R.answer_logits(Oracle(sample, only_first=True), sample), sample, ENC)
    assert [r["correct"] for r in partial] == [True, False, False]
    assert partial[0]["predicted"] == " " + sample["keys"][0]

@pytest.mark.parametrize("wrong_at", [1, 3, 5])
def test_a_key_wrong_after_its_first_token_is_wrong(wrong_at):
    """The whole key must be right: the argmax at every answer position, not just the first."""
    sample = R.passkey_sample(ENC, 600, 0.5, 5, random.Random(11))
    (a, b), = sample["answers"]
    truth = torch.tensor(sample["tokens"][a:b])  # " " and the 5 digits
    logits = torch.zeros(b - a, 320)
    logits[torch.arange(b - a), truth] = 1.0
    [right] = R.judge(logits, sample, ENC)
    assert right["correct"] and right["predicted"] == " " + sample["keys"][0]
    logits[wrong_at] = 0.0
    logits[wrong_at, (truth[wrong_at] + 1) % 256] = 1.0  # another byte, here only
    [wrong] = R.judge(logits, sample, ENC)
    assert not wrong["correct"] and wrong["predicted"][:wrong_at] == right["predicted"][:wrong_at]


# -----------------------------------------------------------------------------
# engines at length: chunked and eager flex equal full attention (sdpa)


def engine_outputs(model, sample, window, engine):
    model.config.engine, model.config.attn_block = engine, 256
    with torch.no_grad():
        return R.answer_logits(model, sample), E.position_losses(model, window, chunk=300)


@pytest.mark.parametrize("attention", ["bam", "scaleinv"])
def test_engines_agree_at_length(attention):
    model = tiny_model(attention)
    sample = R.niah_sample(ENC, 1500, 0.0, 2, None, random.Random(0))
    window = torch.randint(0, 257, (1201,), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_losses = engine_outputs(model, sample, window, "sdpa")
    assert ref_losses.shape == (1200,)
    for engine in ("chunked", "flex"):
        logits, losses = engine_outputs(model, sample, window, engine)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(losses, ref_losses, atol=1e-4, rtol=0)


def test_position_losses_match_the_model_loss():
    model = tiny_model()
    window = torch.randint(0, 257, (301,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, loss = model(window[None, :-1], targets=window[None, 1:])
        losses = E.position_losses(model, window, chunk=64)
    assert losses.shape == (300,)
    assert abs(losses.mean().item() - loss.item()) < 1e-5


def test_position_losses_stay_inside_documents_when_asked():
    """A model trained with --doc-mask is scored with document masking: the losses after an
    end-of-text token equal those of a window that starts at that token."""
    model = tiny_model()
    window = torch.randint(0, 256, (201,), generator=torch.Generator().manual_seed(2))
    window[120] = 256
    with torch.no_grad():
        masked = E.position_losses(model, window, chunk=64, eot=256)
        alone = E.position_losses(model, window[120:], chunk=64, eot=256)
        unmasked = E.position_losses(model, window, chunk=64)
    assert torch.allclose(masked[120:], alone, atol=1e-5)
    assert not torch.allclose(unmasked[120:], alone, atol=1e-3)


def test_32k_forward_memory_is_bounded():
    """32K tokens through the chunked engine, bam + SSMax (its bias is materialized per query tile):
    the T x T float scores alone would take 32768^2 x 4 bytes = 4.3 GB per head; the run must stay
    under 1.5 GB of peak RSS growth, and under the script's own estimate. One layer: peak memory
    does not grow with depth."""
    code = f"""
import random, resource, sys, torch
sys.path.insert(0, {ROOT!r})
import eval_extrapolate as E
from data import retrieval as R
from data.tokenizer import get_tokenizer
from engines import memory as M
from model import GPT, GPTConfig
torch.set_num_threads(1)
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=320, block_size=128, attention="bam",
                      engine="chunked", attn_block=256)).eval()
sample = R.passkey_sample(get_tokenizer("bytes"), 32768, 0.0, 5, random.Random(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    R.answer_logits(model, sample)
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(len(sample["tokens"]) - 1, growth, M.estimate_memory(model, 32768, "chunked", torch.device("cpu"))[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    n_tokens, growth, estimate = map(int, out.stdout.split())
    assert 32768 - UNIT < n_tokens <= 32768
    assert growth < 1.5 * 2 ** 30
    assert growth < estimate < 1.5 * 2 ** 30


def test_memory_estimate_and_engine_choice():
    model = tiny_model()
    cpu = torch.device("cpu")
    # evaluation needs no autograd: the chunked engine's inference tiles at every length, flash for plain NoPE
    assert M.resolve_engine("auto", model, 1024, cpu) == ("chunked", False)
    assert M.resolve_engine("auto", model, 65536, cpu) == ("chunked", False)
    assert M.resolve_engine("auto", tiny_model("nope"), 65536, cpu) == ("sdpa", True)
    sdpa, _ = M.estimate_memory(model, 65536, "sdpa", cpu)
    chunked, _ = M.estimate_memory(model, 65536, "chunked", cpu)
    assert sdpa > 2 * 65536 ** 2 * 4 > 2 ** 30 > chunked  # the T x T term, or a tile


def test_memory_check_refuses_sdpa_where_chunked_fits():
    """At 4096 tokens and a 0.1 GB budget the T x T scores of sdpa do not fit (about 0.4 GB for two
    heads) and the chunked engine's tiles do: sdpa is refused with the advice to use chunked, and
    chunked passes the same check."""
    model, cpu = tiny_model(), torch.device("cpu")
    need = {engine: M.estimate_memory(model, 4096, engine, cpu)[0] for engine in ("sdpa", "chunked")}
    assert need["chunked"] < 0.1 * 2 ** 30 < 3 * 4 * 2 * 4096 ** 2 < need["sdpa"]
    lengths = [("32x", 4096)]
    with pytest.raises(ValueError, match="needs about 0.4 GB with the sdpa engine, 0.1 GB available; use --engine chunked"):
        M.check_memory(model, lengths, argparse.Namespace(max_memory_gb=0.1, task="passkey", engine="sdpa"), cpu)
    M.check_memory(model, lengths, argparse.Namespace(max_memory_gb=0.1, task="passkey", engine="chunked"), cpu)


def test_memory_check_counts_the_loaded_weights_once(monkeypatch):
    """Free memory is read with the model already loaded: a length whose estimate exceeds the free
    memory by less than the weights fits; one that exceeds it by more does not."""
    model = tiny_model(n_embd=256, vocab_size=8192)  # weights dominate the estimate at this length
    cpu, args = torch.device("cpu"), argparse.Namespace(max_memory_gb=None, task="passkey", engine="auto")
    need, _ = M.estimate_memory(model, 1024, "auto", cpu)
    weights = 4 * model.num_params()
    monkeypatch.setattr(M, "available_memory", lambda device: need - weights // 2)
    M.check_memory(model, [("8x", 1024)], args, cpu)
    monkeypatch.setattr(M, "available_memory", lambda device: need - 2 * weights)
    with pytest.raises(ValueError, match="length 8x .* needs about"):
        M.check_memory(model, [("8x", 1024)], args, cpu)

# -----------------------------------------------------------------------------
# bad input


def test_parse_lengths_and_depths():
    assert E.parse_lengths("1x,4x,0.5x,1000", 128) == [("1x", 128), ("4x", 512), ("0.5x", 64), ("1000", 1000)]
    for bad in ("abc", "0x", "1.3x", "-5", "0", "4x,", "1e3"):
        with pytest.raises(ValueError, match="bad length"):
            E.parse_lengths(bad, 128)
    assert E.parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    assert E.parse_depths("even:5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    for bad in ("1.5", "-0.1", "x", "even:1", "even:x"):
        with pytest.raises(ValueError, match="depth"):
            E.parse_depths(bad)


def test_prompt_errors():
    with pytest.raises(ValueError, match="too short for the prompt: the minimum is"):
        R.passkey_sample(ENC, 200, 0.5, 5, random.Random(0))

    class Lowercase:  # a tokenizer that loses capitals
        name, eot_token = "lowercase", 256

        def encode_ordinary(self, text):
            return list(text.lower().encode())

        def decode(self, tokens):
            return bytes(tokens).decode()

    with pytest.raises(ValueError, match="cannot encode"):
        R.passkey_sample(Lowercase(), 1000, 0.5, 5, random.Random(0))


def test_cli_errors_exit_2_without_traceback(tmp_path):
    missing = run_cli("--ckpt", tmp_path / "none.pt")
    bad_length = run_cli("--ckpt", save_tiny(tmp_path / "ckpt.pt"), "--lengths", "1.3x")
    for out in (missing, bad_length):
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "no checkpoint" in missing.stderr and "bad length '1.3x'" in bad_length.stderr


def test_unknown_task_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--ckpt", "x.pt", "--task", "ppl"])
    assert exit_info.value.code == 2 and "invalid choice: 'ppl'" in capsys.readouterr().err


def test_main_errors(tmp_path, capsys):
    ckpt = save_tiny(tmp_path / "ckpt.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint\n")
    small_vocab = save_tiny(tmp_path / "small.pt", tiny_model(vocab_size=64))
    gpt2_data = tmp_path / "gpt2data"
    gpt2_data.mkdir()
    write_meta(str(gpt2_data), tokenizer="gpt2", vocab_size=50257, eot_token=50256)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_meta(str(empty), tokenizer="bytes", vocab_size=257, eot_token=256)
    cases = [
        (["--ckpt", str(junk)], "not a checkpoint of this project's GPT (not a PyTorch file of tensors"),
        (["--ckpt", ckpt, "--task", "niah", "--haystack", str(tmp_path / "none.txt")],
         f"cannot read --haystack {tmp_path / 'none.txt'}: No such file"),
        (["--ckpt", ckpt, "--lengths", "100"], "minimum is"),
        (["--ckpt", ckpt, "--depths", "0,2"], "outside [0, 1]"),
        (["--ckpt", small_vocab, "--lengths", "1000"], "vocab_size 64"),
        (["--ckpt", ckpt, "--lengths", "4096", "--engine", "sdpa", "--max-memory-gb", "0.1"], "use --engine chunked"),
        (["--ckpt", ckpt, "--task", "loss"], "give --data"),
        (["--ckpt", ckpt, "--task", "loss", "--data", str(gpt2_data)], "tokenized with 'gpt2'"),
        (["--ckpt", ckpt, "--task", "loss", "--data", str(empty)], "no val_"),
    ]
    for argv, message in cases:
        assert E.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err

# -----------------------------------------------------------------------------
# whole runs


def test_passkey_run_writes_table_and_json(tmp_path, capsys):
    ckpt = save_tiny(tmp_path / "ckpt.pt")
    assert E.main(["--ckpt", ckpt, "--lengths", "4x,1000", "--depths", "0,1", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "passkey accuracy" in out and "4x (512)" in out and "1000 (1000)" in out
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "eval_passkey_ckpt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "heatmap skipped: matplotlib is not installed" in out
    result = json.loads((tmp_path / "eval_passkey_ckpt.json").read_text())
    assert len(result["results"]) == 2 * 2 * 2
    assert set(result["summary"]) == {"0.0", "1.0", "all"}
    first = result["results"][0]
    assert {"length", "actual_length", "depth", "key", "predicted", "correct"} <= set(first)
    assert first["length"] == 512 and 512 - UNIT < first["actual_length"] <= 512
    assert result["settings"]["task"] == "passkey"


def test_heatmap_is_a_png_or_a_note_without_matplotlib(tmp_path, capsys, monkeypatch):
    grid = {"0.0": {"1x": 1.0, "4x": 0.5}, "1.0": {"1x": 0.0, "4x": 1.0}}  # depth -> length -> accuracy
    args = (grid, [("1x", 128), ("4x", 512)], [0.0, 1.0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    E.save_heatmap(*args, str(tmp_path / "none.png"), "title", "passkey")
    assert "heatmap skipped: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "none.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    E.save_heatmap(*args, str(tmp_path / "map.png"), "title", "passkey")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefix_digits_leave_only_the_rest_to_answer():
    full = R.passkey_sample(ENC, 500, 0.5, 5, random.Random(3))
    given = R.passkey_sample(ENC, 500, 0.5, 5, random.Random(3), prefix_digits=2)
    key = full["keys"][0]
    (a, b), = given["answers"]
    assert given["keys"] == [key] and ENC.decode(given["tokens"][a:b].tolist()) == key[2:]
    assert ENC.decode(given["tokens"][:a].tolist()).endswith("What is the pass key? The pass key is " + key[:2])
    assert len(given["tokens"]) == len(full["tokens"])


def test_patience_stops_the_sweep_after_lengths_at_zero(tmp_path, capsys):
    ckpt = save_tiny(tmp_path / "ckpt.pt")  # untrained: 0 accuracy everywhere
    assert E.main(["--ckpt", ckpt, "--lengths", "4x,5x,6x,7x", "--depths", "0.5", "--samples", "1",
                   "--patience", "2"]) == 0
    out = capsys.readouterr().out
    assert "6x: skipped" in out and "7x: skipped" in out
    result = json.loads((tmp_path / "eval_passkey_ckpt.json").read_text())
    assert sorted({r["label"] for r in result["results"]}) == ["4x", "5x"]
    assert "6x" not in result["summary"]["all"]


def test_niah_run(tmp_path, capsys):
    ckpt = save_tiny(tmp_path / "ckpt.pt")
    out = tmp_path / "niah.json"
    assert E.main(["--ckpt", ckpt, "--task", "niah", "--lengths", "1000", "--depths", "0.5", "--samples", "1",
                   "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["needle"] for r in results] == [0, 1, 2] and all(r["depth"] == 0.5 for r in results)


def test_loss_task(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.array(ENC.encode_ordinary(" ".join([PAPERS_FILLER] * 40)), dtype=np.int64)
    write_shard(str(data / "val_000000.bin"), tokens[:1500])
    write_shard(str(data / "val_000001.bin"), tokens[1500:])  # windows may cross shards
    write_meta(str(data), tokenizer="bytes", vocab_size=257, eot_token=256)
    ckpt = save_tiny(tmp_path / "ckpt.pt", train_config={"data": str(data)})  # the default --data
    assert E.main(["--ckpt", ckpt, "--task", "loss", "--lengths", "1x,3000", "--samples", "3"]) == 0
    result = json.loads((tmp_path / "eval_loss_ckpt.json").read_text())
    assert [r["start"] for r in result["results"][3:]] == np.linspace(0, len(tokens) - 3001, 3).round().tolist()
    one, long = result["summary"]
    assert list(long["buckets"]) == ["[0,1x)", "[1x,2x)", "[2x,4x)", "[4x,8x)", "[8x,16x)", "[16x,32x)"]
    assert abs(one["loss"] - one["buckets"]["[0,1x)"]) < 1e-5
    # the loss of the first window, recomputed directly
    model = tiny_model()
    with torch.no_grad():
        _, loss = model(torch.from_numpy(tokens[None, :128]), targets=torch.from_numpy(tokens[None, 1:129]))
    assert abs(result["results"][0]["loss"] - loss.item()) < 1e-4
    assert "validation loss" in capsys.readouterr().out
    assert E.main(["--ckpt", ckpt, "--task", "loss", "--lengths", "10000"]) == 2
    assert f"has {len(tokens)} tokens; length 10000 needs 10001" in capsys.readouterr().err


def test_loss_task_scores_only_the_masked_tokens(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "loss_mask").mkdir(parents=True)
    tokens = np.array(ENC.encode_ordinary(" ".join([PAPERS_FILLER] * 10)), dtype=np.int64)[:400]
    mask = np.zeros(400, dtype=np.int64)
    mask[50:60] = mask[300:301] = 1
    write_shard(str(data / "val_000000.bin"), tokens)
    write_shard(str(data / "loss_mask" / "val_000000.bin"), mask)
    write_meta(str(data), tokenizer="bytes", vocab_size=257, eot_token=256)
    ckpt = save_tiny(tmp_path / "ckpt.pt", train_config={"data": str(data)})
    assert E.main(["--ckpt", ckpt, "--task", "loss", "--lengths", "399", "--samples", "1"]) == 0
    assert "loss mask counts" in capsys.readouterr().out
    with torch.no_grad():
        losses = E.position_losses(tiny_model(), torch.from_numpy(tokens))
    expected = losses[torch.from_numpy(mask[1:]).bool()].mean().item()  # position i predicts token i + 1
    assert abs(json.loads((tmp_path / "eval_loss_ckpt.json").read_text())["summary"][0]["loss"] - expected) < 1e-5


def test_loss_task_masks_documents_when_the_checkpoint_was_trained_so(tmp_path, capsys):
    """The loss task reads --doc-mask from the checkpoint's train_config: with it, attention stops
    at each end-of-text token; without it, it does not. No flag needed."""
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, 256, 600)
    tokens[[100, 200]] = 256
    write_shard(str(data / "val_000000.bin"), tokens)
    write_meta(str(data), tokenizer="bytes", vocab_size=257, eot_token=256)
    window, model = torch.from_numpy(tokens[:301]), tiny_model()
    with torch.no_grad():
        for p in model.parameters():  # sharper than at init, so that what attention sees shows in the loss
            p.mul_(4)
        want = {True: E.position_losses(model, window, eot=256).mean().item(),
                False: E.position_losses(model, window).mean().item()}
    assert abs(want[True] - want[False]) > 1e-2
    for doc_mask in (True, False):
        ckpt = save_tiny(tmp_path / f"{doc_mask}.pt", model, train_config={"data": str(data), "doc_mask": doc_mask})
        assert E.main(["--ckpt", ckpt, "--task", "loss", "--lengths", "300", "--samples", "1"]) == 0
        got = json.loads((tmp_path / f"eval_loss_{doc_mask}.json").read_text())["summary"][0]["loss"]
        assert abs(got - want[doc_mask]) < 1e-5, doc_mask
