"""train.py and sample.py end to end on a tiny synthetic dataset (CPU)."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sample
import train
from common.checkpoint import save_checkpoint
from model import load_checkpoint
from data import prepare
from data.shards import tokenizer_from_meta
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--batch-size", "4",
        "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "1", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    assert prepare.main(["synthetic", "--docs", "60", "--val-docs", "10", "--out", str(out)]) in (0, None)
    return str(out)


def run_train(data_dir, out_dir, *extra):
    train.main(["--data", data_dir, "--out-dir", str(out_dir), *TINY, *extra])


def error_of(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.strip().startswith("train:")]  # no bar
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one line: no usage, no traceback
    return lines[0]


def state(path):
    return torch.load(path, weights_only=True)


def test_trains_logs_and_checkpoints(data_dir, tmp_path):
    run_train(data_dir, tmp_path, "--max-steps", "6", "--attention", "scaleinv", "--doc-mask")
    assert {"last.pt", "best.pt", "log.jsonl"} <= set(os.listdir(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    assert any("val_loss" in r for r in records)
    model, checkpoint = load_checkpoint(str(tmp_path / "last.pt"))
    assert checkpoint["step"] == 6 and checkpoint["meta"]["tokenizer"] == "words"
    assert model.config.attention == "scaleinv" and model.config.rope == "partial"
    assert not any(k.startswith("_orig_mod") for k in checkpoint["model"])


def test_learning_rate_schedule():
    """Linear warmup to --lr, then a cosine to --min-lr-ratio * --lr at --lr-decay-steps (default:
    --max-steps), flat after it."""
    def cosine(step, start, end, low):
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * (step - start) / (end - start)))
    config = train.TrainConfig(lr=2.0, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    got = [train.learning_rate(step, config) for step in range(25)]
    assert got[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert got[4:] == pytest.approx([2 * cosine(s, 4, 20, 0.1) for s in range(4, 21)] + [0.2] * 4)
    assert got[12] == pytest.approx(2 * 0.55)  # half-way down the cosine
    config = train.TrainConfig(lr=2.0, warmup_steps=0, max_steps=20, min_lr_ratio=0.5, lr_decay_steps=10)
    got = [train.learning_rate(step, config) for step in range(20)]
    assert got == pytest.approx([2 * cosine(s, 0, 10, 0.5) for s in range(10)] + [1.0] * 10)


def spy_on_optimizer_steps(monkeypatch, record):
    """Call record(optimizer) just before each AdamW step."""
    step = torch.optim.AdamW.step

    def record_then_step(self, *args, **kwargs):
        record(self)
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", record_then_step)


def test_training_steps_with_the_schedule(data_dir, tmp_path, monkeypatch):
    used = []  # the learning rate of every parameter group at every step
    spy_on_optimizer_steps(monkeypatch, lambda optimizer: used.append({g["lr"] for g in optimizer.param_groups}))
    run_train(data_dir, tmp_path, "--max-steps", "6", "--lr", "0.01", "--min-lr-ratio", "0.5", "--lr-decay-steps", "4")
    assert all(len(lrs) == 1 for lrs in used)
    used = [lrs.pop() for lrs in used]
    assert used == pytest.approx([0.005, 0.01, 0.01, 0.0075, 0.005, 0.005])  # warmup 2, cosine over 4 steps
    logged = [r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lr" in r]
    assert logged == used


def first_step_gradients(monkeypatch, data_dir, out_dir, *flags):
    """The gradients the optimizer sees at step 0 (after accumulation and clipping)."""
    grads = []
    spy_on_optimizer_steps(monkeypatch, lambda optimizer: grads or grads.extend(
        p.grad.clone() for group in optimizer.param_groups for p in group["params"]))
    run_train(data_dir, out_dir, "--max-steps", "1", *flags)
    return grads


def test_grad_accum_equals_the_large_batch(data_dir, tmp_path, monkeypatch):
    """Two micro-batches of 4 give the gradient of one batch of 8 (the same rows), even though the
    loss mask (answers only) counts a different number of targets in each micro-batch."""
    large = first_step_gradients(monkeypatch, data_dir, tmp_path / "large", "--batch-size", "8")
    accumulated = first_step_gradients(monkeypatch, data_dir, tmp_path / "accum", "--batch-size", "4",
                                       "--grad-accum", "2")
    assert len(large) == len(accumulated) > 0
    for a, b in zip(large, accumulated):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()


def test_exact_prior_gradient_route_follows_the_table_route(data_dir, tmp_path):
    """A whole run of BAM + SSMax with document masks on the chunked engine: the prior's
    gradient from prior_grad.py's extra pass (the default) or through the tables (as before)
    gives the same loss curve and weights, up to float32 rounding."""
    runs = {}
    for route in ("passes", "table"):
        run_train(data_dir, tmp_path / route, "--max-steps", "12", "--engine", "chunked", "--attn-block", "16",
                  "--n-layer", "2", "--doc-mask", "--prior-grad", route)
        runs[route] = ([r["loss"] for r in map(json.loads, open(tmp_path / route / "log.jsonl")) if "loss" in r],
                       state(tmp_path / route / "last.pt")["model"])
    (passes, passes_weights), (table, table_weights) = runs["passes"], runs["table"]
    assert len(passes) == 12 and passes[-1] < passes[0]
    assert max(abs(a - b) / b for a, b in zip(passes, table)) < 1e-4, (passes, table)
    assert any(a != b for a, b in zip(passes, table))  # two computations, not one: rounding differs
    for name in ("positional.0.theta_alpha", "positional.0.theta_beta", "blocks.1.attn.ssmax_scale"):
        assert not torch.equal(passes_weights[name], torch.ones_like(passes_weights[name])), name  # trained
        assert torch.allclose(passes_weights[name], table_weights[name], rtol=1e-4, atol=1e-6), name


def test_resume_is_bit_for_bit(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(data_dir, straight, "--max-steps", "7", "--dropout", "0.1")
    run_train(data_dir, resumed, "--max-steps", "4", "--lr-decay-steps", "7", "--dropout", "0.1")
    run_train(data_dir, resumed, "--max-steps", "7", "--resume")
    a, b = state(straight / "last.pt"), state(resumed / "last.pt")
    assert a["step"] == b["step"] == 7 and a["loader"] == b["loader"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def signal_during_step(monkeypatch, step, *signals):
    """Send the signals to this process while the training loop fetches the batch of `step`."""
    original, calls = train.TokenLoader.next_batch, {"n": 0}

    def next_batch_then_signal(self):
        if "train_" in os.path.basename(self.files[0]):
            calls["n"] += 1
            if calls["n"] == step + 1:
                for signum in signals:
                    os.kill(os.getpid(), signum)
        return original(self)
    monkeypatch.setattr(train.TokenLoader, "next_batch", next_batch_then_signal)


def test_ctrl_c_finishes_the_step_saves_and_resume_continues_exactly(data_dir, tmp_path, monkeypatch, capsys):
    """No regular save before the interrupt (--eval-interval 100): last.pt can only come from the
    Ctrl-C, which lets step 4 finish and saves the boundary after it; with dropout, the resumed
    run's random numbers must continue where they stopped too."""
    flags = ["--max-steps", "7", "--eval-interval", "100", "--dropout", "0.1"]
    run_train(data_dir, tmp_path / "straight", *flags)
    signal_during_step(monkeypatch, 4, signal.SIGINT)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train(data_dir, tmp_path / "stopped", *flags)
    assert e.value.code == 130
    assert "stopped by SIGINT at step 5; saved" in capsys.readouterr().out
    assert state(tmp_path / "stopped" / "last.pt")["step"] == 5
    monkeypatch.undo()
    run_train(data_dir, tmp_path / "stopped", *flags, "--resume")
    a, b = state(tmp_path / "straight" / "last.pt")["model"], state(tmp_path / "stopped" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back


def test_a_second_ctrl_c_stops_at_once_without_saving(data_dir, tmp_path, monkeypatch, capfd):
    signal_during_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        run_train(data_dir, tmp_path, "--max-steps", "7", "--eval-interval", "100")
    assert e.value.code == 130 and "stopped at once, without saving" in capfd.readouterr().err  # os.write(2, ...)
    assert not os.path.exists(tmp_path / "last.pt")


def test_sigterm_saves_at_a_step_boundary_and_resume_equals_a_run_never_stopped(data_dir, tmp_path):
    """A cluster's preemption: SIGTERM from outside to a training process in progress."""
    flags = [*TINY, "--eval-interval", "1000", "--lr-decay-steps", "1000", "--dropout", "0.1"]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", data_dir, "--out-dir", str(stopped), *flags,
                             "--max-steps", "1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (os.path.exists(stopped / "log.jsonl") and len(open(stopped / "log.jsonl").readlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = state(stopped / "last.pt")["step"]
    assert step >= 3 and f"stopped by SIGTERM at step {step}; saved" in out
    train.main(["--data", data_dir, "--out-dir", str(stopped), *flags, "--max-steps", str(step + 2), "--resume"])
    train.main(["--data", data_dir, "--out-dir", str(tmp_path / "straight"), *flags, "--max-steps", str(step + 2)])
    a, b = state(tmp_path / "straight" / "last.pt"), state(stopped / "last.pt")
    assert a["step"] == b["step"] == step + 2 and a["loader"] == b["loader"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def crash_mid_write(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["weights"], torch.ones(3))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    run_train(data_dir, tmp_path, "--max-steps", "3")
    before = state(tmp_path / "last.pt")
    monkeypatch.setattr(train, "learning_rate", lambda step, config: float("nan"))
    err = error_of(capsys, run_train, data_dir, tmp_path, "--max-steps", "9", "--resume")
    assert "loss became nan" in err and "last.pt" in err
    after = state(tmp_path / "last.pt")
    assert after["step"] == before["step"] == 3


def test_a_failed_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path, monkeypatch, capsys):
    """A full disk at the next save (resuming at step 3, an evaluation step, saves again): one line
    naming the folder and the cause, a non-zero exit, and the step-3 checkpoints still load."""
    run_train(data_dir, tmp_path, "--max-steps", "3")

    def disk_full(obj, f):
        f.write(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_full)
    err = error_of(capsys, run_train, data_dir, tmp_path, "--max-steps", "9", "--resume")
    assert f"cannot write last.pt in {tmp_path} at step 3: No space left on device" in err and "--resume" in err
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt", "log.jsonl"]  # no temp file left
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(str(tmp_path / name))[1]["step"] == 3


def test_resume_past_max_steps_has_nothing_to_do(data_dir, tmp_path, capsys):
    run_train(data_dir, tmp_path, "--max-steps", "3")
    before = os.path.getmtime(tmp_path / "last.pt")
    capsys.readouterr()
    run_train(data_dir, tmp_path, "--max-steps", "2", "--resume")
    out = capsys.readouterr().out
    assert f"nothing to do: {tmp_path}/last.pt is at step 3 and --max-steps is 2" in out and "done" not in out
    assert os.path.getmtime(tmp_path / "last.pt") == before


def test_config_file_sets_defaults_and_flags_override(data_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('attention = "alibi"\nmax_steps = 2\nn_embd = 48\n')
    run_train(data_dir, tmp_path / "out", "--config", str(config), "--n-embd", "32")
    checkpoint = state(tmp_path / "out" / "last.pt")
    assert checkpoint["model_config"]["attention"] == "alibi" and checkpoint["model_config"]["n_embd"] == 32
    assert checkpoint["step"] == 2


def test_bad_inputs_give_one_line_errors(data_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "invalid choice: 'rope'" in error_of(capsys, train.main, ["--attention", "rope"])
    assert "data/prepare.py" in error_of(capsys, train.main, ["--data", str(tmp_path / "missing"), "--out-dir", out])
    assert "no backward off CUDA" in error_of(capsys, run_train, data_dir, out, "--engine", "flex")
    bad = tmp_path / "bad.json"
    bad.write_text('{"attentionn": "bam"}')
    assert "unknown settings ['attentionn']" in error_of(capsys, train.main, ["--config", str(bad)])
    bad.write_text("{not json")
    assert "not valid JSON" in error_of(capsys, train.main, ["--config", str(bad)])
    assert "cannot resume" in error_of(capsys, run_train, data_dir, out, "--resume")
    run_train(data_dir, out, "--max-steps", "1")
    err = error_of(capsys, run_train, data_dir, out, "--resume", "--attention", "alibi")
    assert "trained with attention='bam', not 'alibi'" in err


def test_sample_uses_the_cache_and_the_checkpoint_tokenizer(data_dir, tmp_path, capsys, monkeypatch):
    """The prompt reaches the model in the checkpoint's tokenizer (words, not bytes); with the
    cache each new token is one forward of one token, with --no-cache the whole sequence; both
    print the same greedy text, which is the words tokenizer's decoding of the generated ids."""
    run_train(data_dir, tmp_path, "--max-steps", "2")
    enc = tokenizer_from_meta(state(tmp_path / "last.pt")["meta"])
    prompt = enc.encode_ordinary("The pass key is")
    assert len(prompt) == 4  # one token per word: bytes would give 15
    inputs, generated = [], []
    forward, generate = GPT.forward, GPT.generate
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **kw: inputs.append(idx[0].tolist()) or
                        forward(self, idx, *a, **kw))
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **kw: generated.append(generate(self, *a, **kw)) or
                        generated[-1])
    capsys.readouterr()
    args = ["--ckpt", str(tmp_path / "last.pt"), "--max-new-tokens", "12", "--num-samples", "2", "--temperature", "0"]
    sample.main(args + ["--prompt", "The pass key is"])
    cached = capsys.readouterr().out
    assert inputs[0] == prompt and [len(x) for x in inputs] == ([4] + [1] * 11) * 2
    assert cached.count("The pass key is") == 2 and "--- sample 2 ---" in cached
    assert enc.decode(generated[0][0].tolist()) in cached
    inputs.clear()
    sample.main(args + ["--prompt", "The pass key is", "--no-cache"])
    assert [len(x) for x in inputs] == list(range(4, 16)) * 2
    assert capsys.readouterr().out == cached
    assert "no checkpoint" in error_of(capsys, sample.main, ["--ckpt", str(tmp_path / "nope.pt")])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "not a checkpoint" in error_of(capsys, sample.main, ["--ckpt", str(garbage)])


def test_a_token_goes_from_a_shard_to_the_loss_through_four_files(data_dir):
    """README, "What is where": the default training step (bam + SSMax on a CPU) runs code of data/shards.py,
    train.py (the caller here), model.py, attention.py and engines/diagonal.py (the prior's gradient) only."""
    from data.shards import TokenLoader, read_meta
    from model import GPTConfig
    vocab_size = 64 * math.ceil(read_meta(data_dir)["vocab_size"] / 64)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    loader = TokenLoader(data_dir, "train", 4, 64)
    ran = set()

    def profile(frame, event, arg):
        if event == "call":
            ran.add(os.path.relpath(frame.f_code.co_filename, ROOT))
    sys.setprofile(profile)
    try:
        x, y = loader.next_batch()
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
    finally:
        sys.setprofile(None)
    ours = {f for f in ran if not f.startswith(("..", ".venv")) and f.endswith(".py")}
    assert ours == {"data/shards.py", "model.py", "attention.py", "engines/diagonal.py"}, ours
