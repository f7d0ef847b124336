"""--resume: a checkpoint continues on another device, and every flag of train.py given again with
another value is applied and said, or refused in one line (docs/resume.md)."""
import json
import os
import shutil

import pytest
import torch

import engines
import train
from common.checkpoint import restore
from model import load_checkpoint
from common.distributed import World
from data import prepare

BASE = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2",
        "--eval-interval", "2", "--eval-batches", "1", "--log-interval", "1", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    assert prepare.main(["synthetic", "--docs", "40", "--val-docs", "8", "--out", str(out)]) in (0, None)
    return str(out)


def stopped_run(data_dir, folder, *flags):
    """A run of 3 steps stopped after its second (as a preemption leaves it): last.pt at step 2."""
    train.main(["--data", data_dir, "--out-dir", str(folder), *BASE, "--max-steps", "2", *flags])
    path = folder / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["train_config"]["max_steps"] = 3
    torch.save(checkpoint, path)
    return folder


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory):
    return stopped_run(data_dir, tmp_path_factory.mktemp("stopped") / "run")


def resume(data_dir, folder, *flags):
    train.main(["--data", data_dir, "--out-dir", str(folder), "--resume", *flags])


def test_a_checkpoint_resumes_on_another_device_with_its_random_state_on_the_cpu(data_dir, stopped):
    """What --resume on a GPU does, with the "meta" device standing in for CUDA: the model and the
    optimizer state go to the device, the random states stay on the CPU, where torch.set_rng_state
    takes them."""
    config, given = train.parse_config(["--data", data_dir, "--out-dir", str(stopped), "--resume"])
    config, model, checkpoint, changes = train.resume_run(config, given, World(device="meta"))
    assert changes == {} and all(p.device.type == "meta" for p in model.parameters())
    assert checkpoint["rng"]["cpu"].device.type == "cpu"
    model.lm_head.weight = model.wte.weight  # .to("meta") makes new parameters and unties them; .to("cuda") keeps them
    optimizer = torch.optim.AdamW(model.param_groups(config.weight_decay))
    loader = train.TokenLoader(config.data, "train", config.batch_size, model.config.block_size)
    assert restore(checkpoint, optimizer, config, loader, "meta") == (2, checkpoint["best_val_loss"])
    assert all(s["exp_avg"].device.type == "meta" for s in optimizer.state.values())
    assert torch.equal(torch.get_rng_state(), checkpoint["rng"]["cpu"])


# every flag of train.py: what --resume does with it given again with another value
#   "changes": applied from the resumed step on, said on the resume line and in log.jsonl
#   "machine": this command's, whatever the checkpoint's run had (where the run executes)
#   ("refused", words of the one-line error)
#   None: names the run to resume
RESUMES = {
    "config": None, "out_dir": None, "resume": None,
    "device": (["--device", "cpu"], "machine"),
    "dtype": (["--dtype", "bfloat16"], "machine"),
    "compile": (["--no-compile"], "machine"),
    "data": (None, "changes"),  # test_data_may_move_but_not_change
    "seed": (["--seed", "7"], ("refused", "the seed starts a run")),
    "batch_size": (["--batch-size", "3"], ("refused", "would read the data in another order")),
    "grad_accum": (["--grad-accum", "2"], ("refused", "would read the data in another order")),
    "max_steps": (["--max-steps", "4"], "changes"),
    "lr": (["--lr", "0.01"], "changes"),
    "min_lr_ratio": (["--min-lr-ratio", "0.5"], "changes"),
    "warmup_steps": (["--warmup-steps", "3"], "changes"),
    "lr_decay_steps": (["--lr-decay-steps", "10"], "changes"),
    "weight_decay": (["--weight-decay", "0.3"], "changes"),
    "prior_lr_scale": (["--prior-lr-scale", "10"], "changes"),
    "decay_embeddings": (["--no-decay-embeddings"], ("refused", "parameter groups")),
    "beta1": (["--beta1", "0.8"], "changes"),
    "beta2": (["--beta2", "0.99"], "changes"),
    "grad_clip": (["--grad-clip", "0"], "changes"),
    "doc_mask": (["--doc-mask"], ("refused", "what the model attends to")),
    "eval_interval": (["--eval-interval", "5"], "changes"),
    "eval_batches": (["--eval-batches", "2"], "changes"),
    "keep_checkpoints": (["--keep-checkpoints"], "changes"),
    "log_interval": (["--log-interval", "2"], "changes"),
    "block_size": (["--block-size", "48"], ("refused", "the model was built with it")),
    "n_layer": (["--n-layer", "2"], ("refused", "the model was built with it")),
    "n_head": (["--n-head", "4"], ("refused", "the model was built with it")),
    "n_embd": (["--n-embd", "64"], ("refused", "the model was built with it")),
    "dropout": (["--dropout", "0.1"], ("refused", "the model was built with it")),
    "qk_norm": (["--qk-norm"], ("refused", "the model was built with it")),
    "attention": (["--attention", "alibi"], ("refused", "the model was built with it")),
    "ssmax": (["--no-ssmax"], ("refused", "the model was built with it")),
    "ssmax_init": (["--ssmax-init", "0.5"], ("refused", "the model was built with it")),
    "rope": (["--rope", "full"], ("refused", "the model was built with it")),
    "rope_fraction": (["--rope-fraction", "0.5"], ("refused", "the model was built with it")),
    "rope_base": (["--rope-base", "500"], ("refused", "the model was built with it")),
    "scaleinv_tau": (["--scaleinv-tau", "20"], ("refused", "the model was built with it")),
    "prior_per_layer": (["--prior-per-layer"], ("refused", "the model was built with it")),
    "prev_tokens": (["--prev-tokens", "1"], ("refused", "the model was built with it")),
    "key_offset": (["--no-key-offset"], ("refused", "the model was built with it")),
    "engine": (["--engine", "chunked"], "changes"),
    "attn_block": (["--attn-block", "16"], "changes"),
    "prior_grad": (["--prior-grad", "passes"], "changes"),  # and test_prior_grad_given_on_resume_is_used
}


def test_every_flag_of_train_py_has_its_resume_case():
    flags = {action.dest for action in train.build_parser()._actions if action.dest != "help"}
    assert flags == set(RESUMES), f"give the new flag a row in RESUMES: {sorted(flags ^ set(RESUMES))}"


@pytest.mark.parametrize("name", [name for name, case in RESUMES.items() if case and case[0]])
def test_a_flag_changed_on_resume_is_applied_and_said_or_refused_in_one_line(name, data_dir, stopped, tmp_path,
                                                                              capsys):
    flags, outcome = RESUMES[name]
    folder = tmp_path / "run"
    shutil.copytree(stopped, folder)
    saved = torch.load(folder / "last.pt", weights_only=True)
    saved = saved["train_config"] | saved["model_config"]
    capsys.readouterr()
    if outcome[0] == "refused":
        with pytest.raises(SystemExit) as e:
            resume(data_dir, folder, *flags)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: cannot resume: "), err
        assert outcome[1] in err, err
        assert torch.load(folder / "last.pt", weights_only=True)["step"] == 2  # nothing trained
        return
    resume(data_dir, folder, *flags)
    out = capsys.readouterr().out
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    assert checkpoint["step"] == (4 if name == "max_steps" else 3)
    now = (checkpoint["train_config"] | checkpoint["model_config"])[name]
    assert now != saved[name] and now == train.parse_config(flags)[1][name]  # the run recorded the new value
    said = f"changed: {name} {saved[name]} -> {now}"
    records = [json.loads(line) for line in open(folder / "log.jsonl")]
    resumed = [r["resumed_with"] for r in records if "resumed_with" in r]
    if outcome == "changes":
        assert said in out and resumed == [{name: [saved[name], now]}], (out, resumed)
    else:  # where it runs: this command's, nothing to say
        assert "changed:" not in out and resumed == []


def test_optimisation_settings_changed_on_resume_are_the_ones_used(data_dir, stopped, tmp_path):
    """The learning rate of the resumed step (the prior's group at --prior-lr-scale times it), and
    AdamW's betas and weight decay (which the optimizer's saved state would otherwise bring back), are
    the new ones; clipping off leaves no gradient norm in the log."""
    folder = tmp_path / "run"
    shutil.copytree(stopped, folder)
    resume(data_dir, folder, "--lr", "0.01", "--beta1", "0.8", "--beta2", "0.99", "--weight-decay", "0.3",
           "--grad-clip", "0", "--prior-lr-scale", "10")
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    decayed, not_decayed, prior = checkpoint["optimizer"]["param_groups"]
    assert decayed["weight_decay"] == 0.3 and not_decayed["weight_decay"] == 0.0
    assert decayed["betas"] == not_decayed["betas"] == prior["betas"] == (0.8, 0.99)
    step_3 = [r for r in map(json.loads, open(folder / "log.jsonl")) if r.get("step") == 3 and "loss" in r][0]
    config = train.TrainConfig(**checkpoint["train_config"])
    assert config.lr == 0.01 and step_3["lr"] == train.learning_rate(2, config) and "grad_norm" not in step_3
    assert decayed["lr"] == step_3["lr"] and prior["lr"] == 10 * step_3["lr"] and len(prior["params"]) == 2


def test_a_checkpoint_from_before_the_priors_group_resumes_with_its_optimizer_state(data_dir, stopped):
    """Checkpoints saved when the optimizer had two groups (the prior's parameters at the end of the
    second) restore the same AdamW state as the three groups of today."""
    checkpoint = torch.load(stopped / "last.pt", weights_only=True)
    decay, no_decay, prior = checkpoint["optimizer"]["param_groups"]
    assert prior["params"]  # bam: alpha and beta
    older = {k: v for k, v in no_decay.items() if k != "lr_scale"} | {"params": no_decay["params"] + prior["params"]}
    two_groups = checkpoint | {"optimizer": checkpoint["optimizer"] | {"param_groups": [decay, older]}}
    config = train.TrainConfig(**checkpoint["train_config"])
    states = []
    for saved in (checkpoint, two_groups):
        model = load_checkpoint(str(stopped / "last.pt"))[0]
        optimizer = torch.optim.AdamW(model.param_groups(config.weight_decay))
        loader = train.TokenLoader(config.data, "train", config.batch_size, model.config.block_size)
        restore(saved, optimizer, config, loader, "cpu")
        states.append({name: optimizer.state[p] for name, p in model.named_parameters()})
        assert [len(g["params"]) for g in optimizer.param_groups] == [len(decay["params"]), len(no_decay["params"]), 2]
    for name, state in states[0].items():
        assert torch.equal(state["exp_avg"], states[1][name]["exp_avg"]), name


def test_the_prior_learns_at_its_scale_of_the_learning_rate(data_dir, tmp_path):
    """One AdamW step moves each parameter by about its group's learning rate: the prior's
    --prior-lr-scale times as far."""
    moved = []
    for scale in ("1", "10"):
        folder = tmp_path / scale
        train.main(["--data", data_dir, "--out-dir", str(folder), *BASE, "--max-steps", "1", "--batch-size", "8",
                    "--prior-lr-scale", scale])  # 8 windows: some answers to count
        beta = torch.load(folder / "last.pt", weights_only=True)["model"]["positional.0.theta_beta"]
        moved.append((beta - 1).abs())
    assert torch.allclose(moved[1], 10 * moved[0], rtol=1e-3) and (moved[0] > 0).all()


def test_prior_grad_given_on_resume_is_used(data_dir, tmp_path, monkeypatch, capsys):
    """--prior-grad decides how the model is built (GPT.exact_prior_grad): a resume builds it with
    the new value, and the exact route trains the prior."""
    folder = stopped_run(data_dir, tmp_path / "run", "--engine", "chunked", "--prior-grad", "table")
    calls = []
    original = engines.attend_exact
    monkeypatch.setattr(engines, "attend_exact", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    resume(data_dir, folder, "--prior-grad", "passes")
    assert calls and "changed: prior_grad table -> passes" in capsys.readouterr().out
    assert load_checkpoint(str(folder / "last.pt"))[0].config.prior_grad == "passes"


def test_data_may_move_but_not_change(data_dir, stopped, tmp_path, capsys):
    """--data naming another folder: the same dataset moved is used (and said); another one is refused."""
    moved, other = tmp_path / "moved", tmp_path / "other"
    shutil.copytree(data_dir, moved)
    folder = tmp_path / "run"
    shutil.copytree(stopped, folder)
    resume(str(moved), folder)
    assert f"changed: data {data_dir} -> {moved}" in capsys.readouterr().out
    assert torch.load(folder / "last.pt", weights_only=True)["train_config"]["data"] == str(moved)
    assert prepare.main(["synthetic", "--docs", "41", "--val-docs", "8", "--out", str(other)]) in (0, None)
    shutil.rmtree(folder)
    shutil.copytree(stopped, folder)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        resume(str(other), folder)
    err = capsys.readouterr().err
    assert f"error: cannot resume: {folder}/last.pt was trained on the data in {data_dir}, and {other} holds other " \
           f"data" in err and len(err.strip().splitlines()) == 1, err


def test_resume_without_flags_continues_the_runs_own_settings(data_dir, tmp_path):
    """A run started with settings other than the defaults continues with them, not the defaults."""
    folder = stopped_run(data_dir, tmp_path / "run", "--lr", "0.02", "--batch-size", "3")
    resume(data_dir, folder)
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["train_config"]["lr"] == 0.02
    assert checkpoint["train_config"]["batch_size"] == 3 and checkpoint["loader"]["pos"] == 3 * 3 * 32


def test_a_config_file_given_on_resume_is_read_as_its_flags_are(data_dir, stopped, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(stopped, folder)
    config = tmp_path / "more.toml"
    config.write_text("lr = 0.02\n")
    resume(data_dir, folder, "--config", str(config))
    assert "changed: lr 0.003 -> 0.02" in capsys.readouterr().out
    config.write_text("n_layer = 3\n")
    with pytest.raises(SystemExit):
        resume(data_dir, folder, "--config", str(config))
    assert "trained with n_layer=1, not 3" in capsys.readouterr().err
