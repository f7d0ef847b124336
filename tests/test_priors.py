"""The prior contract (README, "Adding a prior"): the README's FIRE-like MLP prior, run as the README
writes it, and the scores the model must refuse."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn

import train
from attention import VARIANTS, NoPE, document_ids, prior_score
from model import GPT, GPTConfig, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(n_layer=3, n_head=2, n_embd=32, vocab_size=64, block_size=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data import prepare
    out = tmp_path_factory.mktemp("data") / "synthetic"
    assert prepare.main(["synthetic", "--docs", "40", "--val-docs", "8", "--out", str(out)]) in (0, None)
    return str(out)


@pytest.mark.parametrize("per_layer", [False, True])
def test_fire_keeps_its_own_init_and_never_decays(fire, monkeypatch, per_layer):
    made = []  # each prior's parameters as its own __init__ left them
    own_init = fire.__init__

    def recording_init(self, config):
        own_init(self, config)
        made.append({k: v.clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(fire, "__init__", recording_init)
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention="fire", prior_per_layer=per_layer, **SMALL))
    assert len(model.positional) == len(made) == (3 if per_layer else 1)
    for prior, at_init in zip(model.positional, made):
        assert prior.state_dict().keys() == at_init.keys()
        for name, value in prior.state_dict().items():
            assert torch.equal(value, at_init[name]), name
    decay, no_decay, prior = model.param_groups(0.1)
    prior_params = {id(p) for p in model.positional.parameters()}
    assert any(p.dim() == 2 for p in model.positional.parameters())  # the MLP's matrices: a 2-D rule would decay them
    assert decay["params"] and not prior_params & {id(p) for p in decay["params"] + no_decay["params"]}
    assert prior_params == {id(p) for p in prior["params"]} and prior["weight_decay"] == 0.0


def test_fire_per_layer_gives_the_same_gradients_on_sdpa_and_chunked(fire):
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention="fire", prior_per_layer=True, ssmax=True, attn_block=8, **SMALL))
    idx = torch.randint(1, 64, (2, 41))
    idx[:, 15] = 0  # a second document
    x, y = idx[:, :-1], idx[:, 1:]
    grads = {}
    for engine in ("sdpa", "chunked"):
        model.config.engine = engine
        model.zero_grad()
        model(x, y, doc=document_ids(x, 0))[1].backward()
        grads[engine] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads["sdpa"].items():
        assert torch.allclose(grad, grads["chunked"][name], rtol=1e-4, atol=1e-6), name
    for i in range(3):  # every layer's own prior is used and trained
        assert all(grads["sdpa"][n].abs().sum() > 0 for n in grads["sdpa"] if n.startswith(f"positional.{i}."))


def test_fire_trains_with_train_py_and_its_checkpoint_loads(fire, data_dir, tmp_path):
    out = tmp_path / "out"
    train.main(["--data", data_dir, "--out-dir", str(out), "--attention", "fire", "--prior-per-layer",
                "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--batch-size", "4",
                "--max-steps", "12", "--eval-interval", "6", "--eval-batches", "2", "--log-interval", "1",
                "--warmup-steps", "2", "--lr", "1e-2"])
    losses = [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    model, checkpoint = load_checkpoint(str(out / "last.pt"))
    assert len(model.positional) == 2
    torch.manual_seed(checkpoint["train_config"]["seed"])  # the model train.py started from
    start = GPT(GPTConfig(**dataclasses.asdict(model.config)))
    for trained, initial in zip(model.positional.parameters(), start.positional.parameters()):
        assert not torch.equal(trained, initial)  # every weight of both priors moved


class BatchRow(nn.Module):
    """A score that reads the batch row: a per-sequence offset."""
    additive = True

    def __init__(self, config):
        super().__init__()
        self.offset = nn.Parameter(torch.arange(4.0))

    def forward(self, n, device):
        return {"offset": self.offset}

    @staticmethod
    def score(s, b, h, q, kv, tables):
        return s + tables["offset"][b]


class ContentGate(nn.Module):
    """A Forgetting-Transformer-like gate per (batch row, key position), as content would give it."""
    additive = True

    def __init__(self, config):
        super().__init__()
        self.register_buffer("gate", torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)))

    def forward(self, n, device):
        return {"gate": self.gate[:, :n]}

    @staticmethod
    def score(s, b, h, q, kv, tables):
        return s + tables["gate"][b, kv]


class Progressive(NoPE):
    """FIRE's progressive interpolation: the distance divided by the query's position."""

    @staticmethod
    def score(s, b, h, q, kv, tables):
        return s - (q - kv) / (q + 1)


class CappedProgressive(NoPE):
    """FIRE's progressive interpolation with its threshold L = 64: the distance divided by
    max(L, query position), a function of the distance alone up to position 64."""

    @staticmethod
    def score(s, b, h, q, kv, tables):
        return s - (q - kv) / torch.clamp(q, min=64)


class LengthScaled(NoPE):
    """A prior over the distance relative to the length it is built for: its table at a given
    distance changes with the sequence, so a KV cache's earlier positions saw another prior."""

    def __init__(self, config):
        super().__init__(config)
        self.n_head = config.n_head

    def forward(self, n, device):
        return {"prior": (-torch.arange(n, dtype=torch.float32, device=device) / n).expand(self.n_head, n)}

    score = staticmethod(prior_score)


@pytest.mark.parametrize("cls", [BatchRow, ContentGate, Progressive, CappedProgressive, LengthScaled])
def test_a_score_beyond_head_and_distance_is_refused_in_one_line(cls, monkeypatch, capsys, data_dir, tmp_path):
    monkeypatch.setitem(VARIANTS, "odd", cls)
    with pytest.raises(ValueError) as e:
        GPT(GPTConfig(attention="odd", **SMALL))
    message = str(e.value)
    assert "breaks the prior contract" in message and "\n" not in message, message
    with pytest.raises(SystemExit) as e:  # and train.py says so in one line, before anything runs
        train.main(["--attention", "odd", "--out-dir", str(tmp_path / "out"), "--data", data_dir])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "breaks the prior contract" in err and not (tmp_path / "out").exists()
