"""The GPT: causality, document isolation, training signal, KV cache, parameter groups."""
import dataclasses
import math
import shutil

import pytest
import torch

from attention import VARIANTS, document_ids, rotary_frequencies
from common.checkpoint import save_checkpoint
from model import load_checkpoint
from model import GPT, GPTConfig

EOT = 0


def tiny(name, **overrides):
    torch.manual_seed(0)
    config = dict(attention=name, n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)
    config.update(overrides)
    model = GPT(GPTConfig(**config)).eval()
    if model.config.prev_tokens:  # trained-like weights: at init only w_0 is nonzero, hiding any leak
        torch.nn.init.normal_(model.prev_weight)
    return model


def all_logits(model, idx, doc=None):
    with torch.no_grad():
        return model(idx, doc=doc, logits_at=torch.arange(idx.shape[1]))[0]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("engine", ["sdpa", "chunked", "flex"])
def test_causal_and_document_isolation(name, engine):
    model = tiny(name, engine=engine, attn_block=8, qk_norm=True)
    idx = torch.randint(1, 64, (2, 30))
    idx[:, 12] = EOT  # document 2 starts at position 12
    base = all_logits(model, idx, document_ids(idx, EOT))

    later = idx.clone()
    later[:, 20] = (later[:, 20] + 1) % 63 + 1
    changed = all_logits(model, later, document_ids(later, EOT))
    assert torch.allclose(changed[:, :20], base[:, :20], atol=1e-5)
    assert not torch.allclose(changed[:, 20:], base[:, 20:], atol=1e-3)

    other_doc = idx.clone()
    other_doc[:, [5, 11]] = (other_doc[:, [5, 11]] + 1) % 63 + 1  # tokens of document 1, one just before document 2
    changed = all_logits(model, other_doc, document_ids(other_doc, EOT))
    assert torch.allclose(changed[:, 12:], base[:, 12:], atol=1e-5)
    # without document ids the same change is seen: the comparison above could have failed
    assert not torch.allclose(all_logits(model, other_doc)[:, 12:], all_logits(model, idx)[:, 12:], atol=1e-3)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("ssmax", [False, True])
def test_scored_positions_equal_a_full_forward(name, ssmax):
    """Logits at a few positions (the last layer computing queries from the first of them on only)
    equal those of a full forward, on sdpa and chunked, with documents and rotary."""
    model = tiny(name, ssmax=ssmax, rope="partial", attn_block=8, qk_norm=True)
    idx = torch.randint(1, 64, (2, 50))
    idx[:, 12] = EOT
    doc = document_ids(idx, EOT)
    model.config.engine = "sdpa"
    full = all_logits(model, idx, doc)
    rows = []
    model.blocks[-1].mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    for engine in ("sdpa", "chunked"):
        model.config.engine = engine
        with torch.no_grad():
            for positions in (torch.tensor([33, 34, 40, 49]), None):
                got = model(idx, doc=doc, logits_at=positions)[0]
                want = full[:, -1:] if positions is None else full[:, positions]
                assert torch.allclose(got, want, atol=1e-5), (engine, positions)
    assert rows == [50 - 33, 1] * 2  # the last layer's queries: from the first scored position on


@pytest.mark.parametrize("name,rope", [(name, "none") for name in VARIANTS] + [("nope", "full"), ("scaleinv", "full"),
                                                                         ("nope", "partial"), ("bam", "partial")])
def test_attention_depends_on_relative_position_only(name, rope):
    """A document at position 12 of a row (document masking on) gets the logits it gets alone at
    position 0: priors, SSMax, rotary (full and p-RoPE) and the previous-token path see only
    distances inside the document."""
    model = tiny(name, rope=rope, qk_norm=True)
    idx = torch.randint(1, 64, (2, 30))
    idx[:, 12] = EOT
    shifted = all_logits(model, idx, document_ids(idx, EOT))[:, 12:]
    alone = all_logits(model, idx[:, 12:], document_ids(idx[:, 12:], EOT))
    assert torch.allclose(shifted, alone, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_generation_equals_full_recomputation(name):
    model = tiny(name, prior_per_layer=True)
    prompt = torch.randint(1, 64, (2, 9))
    cached = model.generate(prompt, 15, temperature=0, use_cache=True)
    full = model.generate(prompt, 15, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    # and the logits themselves, token by token, past the training length
    cache = model.new_cache()
    seq = torch.randint(1, 64, (1, 45))
    with torch.no_grad():
        step_logits = [model(seq[:, :20], cache=cache, logits_at=torch.arange(20))[0]]
        for t in range(20, 45):
            step_logits.append(model(seq[:, t:t + 1], cache=cache)[0])
    assert torch.allclose(torch.cat(step_logits, dim=1), all_logits(model, seq), atol=1e-5)


def test_sampling_with_cache_matches_without_for_a_seed():
    model = tiny("bam")
    prompt = torch.randint(1, 64, (1, 5))
    a = model.generate(prompt, 10, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 10, temperature=0.8, top_k=10, use_cache=False,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["bam", "scaleinv"])
def test_tiny_model_overfits_a_fixed_batch(name):
    model = tiny(name).train()
    idx = torch.randint(1, 64, (4, 33))
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    losses = []
    for _ in range(100):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.5, losses[::10]


def test_bam_prior_and_ssmax_receive_gradients():
    for per_layer in (False, True):
        model = tiny("bam", prior_per_layer=per_layer).train()
        idx = torch.randint(1, 64, (2, 17))
        _, loss = model(idx[:, :-1], idx[:, 1:], doc=document_ids(idx[:, :-1], EOT))
        loss.backward()
        priors = [p for n, p in model.named_parameters() if "theta" in n]
        scales = [p for n, p in model.named_parameters() if "ssmax_scale" in n]
        assert len(priors) == (2 * 2 if per_layer else 2) and len(scales) == 2
        for p in priors + scales:
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_param_groups_never_decay_priors_norms_or_ssmax():
    model = tiny("bam", prior_per_layer=True)
    decay, no_decay, prior = model.param_groups(0.1, prior_lr_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 == prior["weight_decay"]
    assert not any("theta" in n or "ssmax" in n or "ln_" in n for n in decayed)
    assert "wte.weight" in decayed and "blocks.0.attn.c_attn.weight" in decayed
    assert {names[id(p)] for p in prior["params"]} == {f"positional.{i}.theta_{x}" for i in range(2)
                                                       for x in ("alpha", "beta")}
    assert prior["lr_scale"] == 10.0 and "lr_scale" not in decay and "lr_scale" not in no_decay
    decay, no_decay, prior = model.param_groups(0.1, decay_embeddings=False)
    assert "wte.weight" not in {names[id(p)] for p in decay["params"]}
    # every parameter once; the undecayed ones, then the prior's, in named_parameters' order: older
    # checkpoints' second group, which common.checkpoint.restore splits at the prior's first parameter
    decayed = {id(p) for p in decay["params"]}
    assert len(decayed) + len(no_decay["params"]) + len(prior["params"]) == len(list(model.parameters()))
    assert [id(p) for p in no_decay["params"] + prior["params"]] == \
        [id(p) for p in model.parameters() if id(p) not in decayed]


def test_defaults_and_bad_config():
    assert GPTConfig(attention="bam").ssmax is True and GPTConfig(attention="alibi").ssmax is False
    assert GPTConfig(attention="scaleinv").rope == "partial" and GPTConfig(attention="nope").rope == "none"
    # with QK-norm, SSMax starts neutral at the training length: s_h log(block_size) = 1
    assert GPTConfig(qk_norm=True, block_size=128).ssmax_init == pytest.approx(1 / math.log(128))
    assert GPTConfig(qk_norm=False).ssmax_init == 1.0 and GPTConfig(qk_norm=True, ssmax_init=0.5).ssmax_init == 0.5
    assert torch.equal(tiny("bam", qk_norm=True, block_size=64).blocks[1].attn.ssmax_scale, torch.full((2,), 1 / math.log(64)))
    for bad, match in [(dict(attention="rope"), "attention must be one of nope, alibi, bam, scaleinv, got 'rope'"),
                       (dict(engine="fast"), "engine must be one of"),
                       (dict(n_embd=30, n_head=4), "not divisible"),
                       (dict(rope="half"), "rope must be one of"),
                       (dict(n_layer=2.0), "n_layer must be a whole number >= 1, got 2.0"),
                       (dict(qk_norm=1), "qk_norm must be true or false, got 1"),
                       (dict(dropout=1.0), r"dropout must be a finite number >= 0 and < 1, got 1.0"),
                       (dict(rope_base=float("nan")), "rope_base must be a finite number > 0, got nan"),
                       (dict(ssmax_init=0.0), "ssmax_init must be a finite number > 0, got 0.0"),
                       (dict(rope_fraction=1.5), r"rope_fraction must be a finite number >= 0 and <= 1, got 1.5")]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**bad)


def test_p_rope_rotates_the_pairs_whose_wavelength_fits_in_the_block():
    """p-RoPE's default: the pairs whose wavelength 2 pi / freq is at most block_size rotate, the
    rest stay still; at the scale-invariant paper's 4K tokens that is close to its 75%."""
    for head_dim, block, base in ((32, 128, 1e4), (64, 4096, 1e4), (64, 1024, 500.0), (16, 4, 1e4)):
        config = GPTConfig(n_head=2, n_embd=2 * head_dim, block_size=block, rope_base=base, attention="scaleinv")
        freqs = rotary_frequencies(head_dim, base, config.rope_fraction)
        wavelengths = 2 * torch.pi / rotary_frequencies(head_dim, base, 1.0)
        assert torch.equal(freqs > 0, wavelengths <= block), (head_dim, block, base)
    assert GPTConfig(n_head=4, n_embd=128, block_size=128).rope_fraction == 6 / 16
    assert 0.7 < GPTConfig(n_head=12, n_embd=768, block_size=4096).rope_fraction < 0.75
    assert GPTConfig(block_size=128, rope_fraction=0.75).rope_fraction == 0.75  # given: kept


def test_the_p_rope_choice_is_stored_and_older_checkpoints_keep_theirs(tmp_path):
    model = tiny("scaleinv", block_size=128)
    assert model.config.rope_fraction == 0.375
    assert torch.equal(model.blocks[0].attn.inv_freq > 0, torch.arange(8) < 3)  # 3 of 8 pairs (head size 16)
    path = str(tmp_path / "new.pt")
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, path)
    assert load_checkpoint(path)[0].config.rope_fraction == 0.375
    old = dataclasses.asdict(model.config) | {"rope_fraction": 0.75}  # written before the rule
    save_checkpoint({"model": model.state_dict(), "model_config": old}, path)
    loaded = load_checkpoint(path)[0]
    assert loaded.config.rope_fraction == 0.75 and int((loaded.blocks[0].attn.inv_freq > 0).sum()) == 6


@pytest.mark.parametrize("name", ["bam", "alibi"])
def test_checkpoints_with_bam_per_layer_load_as_prior_per_layer(name, tmp_path):
    """Before every variant could have a prior per layer, the field was bam_per_layer (bam only)."""
    model = tiny(name, prior_per_layer=name == "bam")
    old = dataclasses.asdict(model.config)
    old["bam_per_layer"] = old.pop("prior_per_layer") or name == "alibi"  # alibi ignored it: one prior
    path = str(tmp_path / "old.pt")
    save_checkpoint({"model": model.state_dict(), "model_config": old}, path)
    loaded, checkpoint = load_checkpoint(path)
    assert loaded.config.prior_per_layer == (name == "bam") and len(loaded.positional) == len(model.positional)
    assert "bam_per_layer" not in checkpoint["model_config"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_runs_far_past_block_size():
    model = tiny("scaleinv", block_size=16)
    logits, _ = model(torch.randint(1, 64, (1, 300)), logits_at=torch.tensor([0, 299]))
    assert logits.shape == (1, 2, 64) and torch.isfinite(logits).all()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_inductor_compiles_the_flex_model_at_changing_lengths():
    """torch.compile with Inductor (as on a GPU, here its CPU backend) lowers flex inside the whole
    model, with the prior's tables and the SSMax factor captured, first at static shapes and then
    at dynamic ones, and gives the logits of eager sdpa."""
    model = tiny("alibi", engine="flex")
    compiled = torch.compile(model)
    for T in (200, 333):
        idx = torch.randint(1, 64, (1, T))
        with torch.no_grad():
            model.config.engine = "flex"
            got = compiled(idx)[0]  # logits at the last position
            model.config.engine = "sdpa"
            assert torch.allclose(got, model(idx)[0], atol=1e-5), T


def test_bam_learns_to_retrieve_when_the_loss_is_on_the_answer():
    """The smallest retrieval task: one 'key' token (ids 32..63) hidden among random filler
    (ids 0..31); the target at the last position is that key. With the loss on the answer
    only, bam (+SSMax, no rotary) must find and copy it: this is the circuit passkey retrieval
    needs, and it must be learnable through the whole attention stack."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention="bam", n_layer=2, n_head=4, n_embd=128, vocab_size=64, block_size=64))
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3, betas=(0.9, 0.95))
    B, T, rows = 32, 64, torch.arange(32)
    for step in range(400):
        x = torch.randint(0, 32, (B, T))
        key = torch.randint(32, 64, (B,))
        x[rows, torch.randint(0, T - 1, (B,))] = key
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, -1], key)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (logits[:, -1].argmax(-1) == key).float().mean() == 1.0:
            break
    with torch.no_grad():  # a fresh batch
        x = torch.randint(0, 32, (256, T))
        key = torch.randint(32, 64, (256,))
        x[torch.arange(256), torch.randint(0, T - 1, (256,))] = key
        accuracy = (model(x)[0][:, -1].argmax(-1) == key).float().mean().item()
    assert accuracy > 0.95, f"retrieval accuracy {accuracy:.2f} after {step + 1} steps"


def marker_task_loss(steps, **path):
    """The marker task (issue 9's probe): filler from 60 tokens, a KEY marker, then the key, drawn
    from the same 60 tokens, so only what precedes it marks it; a QUERY marker ends the row and
    the target is the key. Returns the answer loss on a fresh batch after training."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention="nope", n_layer=2, n_head=4, n_embd=64, vocab_size=64, block_size=48, **path))
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3, betas=(0.9, 0.95))
    KEY, QUERY, B, T = 60, 61, 32, 48

    def batch(n):
        x = torch.randint(0, 60, (n, T))
        at = torch.randint(0, T - 3, (n,))
        x[torch.arange(n), at], x[:, -1] = KEY, QUERY
        return x, x[torch.arange(n), at + 1]
    for _ in range(steps):
        x, key = batch(B)
        loss = torch.nn.functional.cross_entropy(model(x)[0][:, -1], key)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x, key = batch(512)
        return torch.nn.functional.cross_entropy(model(x)[0][:, -1], key).item()


def test_previous_token_path_lets_a_tiny_model_learn_the_marker_task():
    """Chance is log(60) = 4.09. With the previous-token path the answer loss falls far below it;
    without it, the same model and steps stay at chance."""
    with_path = marker_task_loss(250)
    without = marker_task_loss(250, prev_tokens=0, key_offset=False)
    assert with_path < 1.0 and without > 3.5, (with_path, without)
