"""eval_extrapolate.py sweeps that survive a stop: results after every cell, SIGTERM at a cell
boundary, --resume that recomputes nothing finished and refuses another checkpoint or settings."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval_extrapolate as E
from common.checkpoint import save_checkpoint
from data.shards import write_meta, write_shard
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"tokenizer": "bytes", "vocab_size": 257, "eot_token": 256}
# 5 lengths x 8 depths = 40 cells of 4 prompts each; bytes tokens, so the prompts need ~300 tokens
SWEEP = ["--task", "passkey", "--lengths", "400,500,600,700,800", "--depths", "even:8", "--samples", "4",
         "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny(path, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=320, block_size=128))
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "meta": META,
                     "step": 0}, str(path))
    return str(path)


def without_timings(path):
    """The results file with what may differ between two runs of the same sweep removed: the seconds."""
    saved = json.loads(open(path).read())
    for r in saved["results"]:
        del r["seconds"]
    return saved


def count_prompts(monkeypatch):
    calls = []
    real = E.answer_logits
    monkeypatch.setattr(E, "answer_logits", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_sweep_stopped_by_sigterm_resumes_to_the_same_results(tmp_path, monkeypatch, capsys):
    ckpt, out = save_tiny(tmp_path / "ckpt.pt"), tmp_path / "sweep.json"
    argv = ["--ckpt", ckpt, *SWEEP, "--out", str(out)]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "eval_extrapolate.py"), *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    while not out.exists() and process.poll() is None:  # the first cell is written: stop the sweep
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stdout and "--resume" in stdout
    stopped = json.loads(out.read_text())
    finished = {(r["length"], r["depth"]) for r in stopped["results"]}
    assert stopped["complete"] is False and 1 <= len(finished) < 40
    assert len(stopped["results"]) == 4 * len(finished)  # whole cells only
    assert "accuracy" in stdout  # the finished cells' table was printed

    calls = count_prompts(monkeypatch)
    assert E.main(argv + ["--resume"]) == 0
    assert len(calls) == 4 * (40 - len(finished))  # nothing finished was recomputed
    resumed = without_timings(out)
    assert resumed["complete"] is True and len(resumed["results"]) == 160
    assert E.main(argv) == 0  # the same sweep, never stopped
    assert without_timings(out) == resumed


def test_resume_refuses_other_settings_or_another_checkpoint(tmp_path, capsys):
    ckpt, out = save_tiny(tmp_path / "ckpt.pt"), tmp_path / "sweep.json"
    argv = ["--ckpt", ckpt, "--task", "passkey", "--lengths", "400", "--depths", "0,1", "--samples", "1",
            "--out", str(out), "--device", "cpu"]
    assert E.main(argv + ["--resume"]) == 2
    assert "no sweep to continue" in capsys.readouterr().err
    assert E.main(argv) == 0
    capsys.readouterr()
    for change, word in ((["--seed", "7"], "seed"), (["--samples", "2"], "samples"), (["--digits", "6"], "digits")):
        assert E.main(argv + change + ["--resume", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"made with {word} = " in err, err
    save_tiny(ckpt, seed=1)  # retrained in place: another model at the same path
    assert E.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256" in err
    assert json.loads(out.read_text())["complete"] is True  # the refused runs left the file as it was


def test_a_stopped_loss_sweep_resumes_length_by_length(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_meta(str(data), **META)
    write_shard(str(data / "val_000.bin"), torch.randint(0, 256, (3000,)).numpy())
    ckpt, out = save_tiny(tmp_path / "ckpt.pt"), tmp_path / "loss.json"
    argv = ["--ckpt", ckpt, "--task", "loss", "--lengths", "200,400,600", "--samples", "2", "--data", str(data),
            "--out", str(out), "--device", "cpu"]
    assert E.main(argv) == 0
    never_stopped = without_timings(out)

    class StopAfterTwoWindows:  # as a SIGTERM after the first length's two windows
        signum = None
    stop = StopAfterTwoWindows()
    real = E.position_losses
    calls = []

    def counted(*a):
        calls.append(1)
        if len(calls) == 3:
            stop.signum = signal.SIGTERM
        return real(*a)
    monkeypatch.setattr(E, "position_losses", counted)
    saved = []
    evaluation = E.evaluate(E.parse_args(argv), lambda ev: saved.append(ev["complete"]) or E.save_json(
        {k: ev[k] for k in ("settings", "complete", "summary", "results")}, str(out)), stop)
    assert evaluation["complete"] is False and [s["length"] for s in evaluation["summary"]] == [200]
    assert saved == [False]  # written after the finished length, not after the unfinished one
    calls.clear()
    assert E.main(argv + ["--resume"]) == 0
    assert len(calls) == 4  # the two unfinished lengths only
    assert without_timings(out) == never_stopped


def test_each_checkpoint_of_a_run_has_its_own_results(tmp_path, capsys):
    """best.pt and last.pt in one folder: each evaluation writes its own file, and a --resume of
    one never continues the other's."""
    best, last = save_tiny(tmp_path / "best.pt"), save_tiny(tmp_path / "last.pt", seed=1)
    argv = ["--task", "passkey", "--lengths", "400", "--depths", "0", "--samples", "1", "--device", "cpu"]
    for ckpt, name in ((best, "best"), (last, "last")):
        assert E.main(["--ckpt", ckpt, *argv]) == 0
        assert f"wrote {tmp_path}/eval_passkey_{name}.json" in capsys.readouterr().out
    for name in ("best", "last"):
        assert json.loads((tmp_path / f"eval_passkey_{name}.json").read_text())["settings"]["ckpt"].endswith(f"{name}.pt")
    assert E.main(["--ckpt", last, *argv, "--out", str(tmp_path / "eval_passkey_best.json"), "--resume"]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_resume_compares_data_and_haystack_by_content_not_path(tmp_path, capsys):
    """The same --haystack file or --data folder moved elsewhere continues a sweep; the same path
    with other content is refused in one line."""
    ckpt = save_tiny(tmp_path / "ckpt.pt")
    haystack, moved = tmp_path / "book.txt", tmp_path / "moved.txt"
    haystack.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 40)
    out = tmp_path / "niah.json"
    niah = ["--ckpt", ckpt, "--task", "niah", "--lengths", "600", "--depths", "0,1", "--samples", "1",
            "--device", "cpu", "--out", str(out)]
    assert E.main(niah + ["--haystack", str(haystack)]) == 0
    moved.write_bytes(haystack.read_bytes())
    assert E.main(niah + ["--haystack", str(moved), "--resume"]) == 0
    haystack.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 40)
    capsys.readouterr()
    assert E.main(niah + ["--haystack", str(haystack), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the SHA-256 of --haystack" in err, err

    data, copy = tmp_path / "data", tmp_path / "copy"
    data.mkdir()
    write_meta(str(data), **META)
    write_shard(str(data / "val_000.bin"), torch.randint(0, 256, (3000,)).numpy())
    out = tmp_path / "loss.json"
    loss = ["--ckpt", ckpt, "--task", "loss", "--lengths", "200", "--samples", "1", "--device", "cpu", "--out", str(out)]
    assert E.main(loss + ["--data", str(data)]) == 0
    shutil.copytree(data, copy)
    assert E.main(loss + ["--data", str(copy), "--resume"]) == 0
    write_shard(str(data / "val_000.bin"), torch.randint(0, 256, (3000,)).numpy())  # remade in place
    capsys.readouterr()
    assert E.main(loss + ["--data", str(data), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the SHA-256 of --data's val split" in err, err
