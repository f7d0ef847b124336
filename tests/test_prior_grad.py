"""prior_grad.py's exact route and diagonal.py's against autograd through sdpa, in float64: every
gradient of an attention call (q, k, v, each prior parameter, the SSMax scale), the forward passes of
both engines, the per-layer prior in a whole model, and the fallback for variants it cannot take."""
import pytest
import torch
import torch.nn as nn

import engines
from attention import BAM, ALiBi, AttentionArgs, ScaleInvariant, distance, make_score_mod, prior_score, ssmax_factor
from engines import prior_grad
from engines.diagonal import diagonal_attention
from engines.flex import flex_block_mask
from engines.prior_grad import (attend_exact, attend_with_lse, derivative_tables, gradient_weights, prior_repeats,
                                prior_table, route_problem)
from model import GPT, GPTConfig, attend

H, D, B = 4, 8, 2
TOLERANCE = 1e-9  # float64: the route and autograd differ by rounding only (1e-15 seen)


class Cauchy(nn.Module):
    """A Cauchy prior: b_h(t) = -log(1 + (t / w_h)^2), width w_h learned per head."""
    additive = True
    score = staticmethod(prior_score)

    def __init__(self, config):
        super().__init__()
        self.log_width = nn.Parameter(torch.linspace(-1, 2, config.n_head))

    def forward(self, n, device):
        t = torch.arange(n, device=device, dtype=self.log_width.dtype)
        return {"prior": -torch.log1p((t / self.log_width.exp()[:, None]) ** 2)}


class Centred(nn.Module):
    """A prior around a learned distance c_h: b_h(t) = -a_h (t - c_h)^2. Its derivative in c_h
    changes sign at t = c_h: the route's shifted case (m < 0), and a large t = 0 term."""
    additive = True
    score = staticmethod(prior_score)

    def __init__(self, config):
        super().__init__()
        self.log_a = nn.Parameter(torch.linspace(-6, -3, config.n_head))
        self.centre = nn.Parameter(torch.tensor([0.0, 3.0, 10.0, 30.0])[:config.n_head])

    def forward(self, n, device):
        t = torch.arange(n, device=device, dtype=self.centre.dtype)
        return {"prior": -self.log_a.exp()[:, None] * (t - self.centre[:, None]) ** 2}


class Gain(nn.Module):
    """An affine prior that trains both tables: a_h(t) = 1 + exp(g_h) log(1 + t) / 4, f_h(t) = -m_h t."""
    additive, affine = False, True

    def __init__(self, config):
        super().__init__()
        self.log_gain = nn.Parameter(torch.linspace(-0.3, 0.3, config.n_head))
        self.slope = nn.Parameter(torch.linspace(0.05, 0.2, config.n_head))

    def forward(self, n, device):
        t = torch.arange(n, device=device, dtype=self.slope.dtype)
        return {"a": 1 + self.log_gain.exp()[:, None] * torch.log1p(t) / 4, "m": -self.slope[:, None] * t}

    @staticmethod
    def score(s, b, h, q, kv, tables):
        t = distance(q, kv)
        return s * tables["a"][h, t] + tables["m"][h, t]


class SharedWidth(Cauchy):
    """One width for all heads: not per head, so the route does not apply."""
    def __init__(self, config):
        nn.Module.__init__(self)
        self.n_head = config.n_head
        self.log_width = nn.Parameter(torch.zeros(1))

    def forward(self, n, device):
        t = torch.arange(n, device=device, dtype=self.log_width.dtype)
        return {"prior": -torch.log1p((t / self.log_width.exp().expand(self.n_head)[:, None]) ** 2)}


class MixedHeads(Cauchy):
    """Per-head parameters that each move every head's prior: not per head either."""
    def forward(self, n, device):
        t = torch.arange(n, device=device, dtype=self.log_width.dtype)
        return {"prior": -torch.log1p((t / self.log_width.exp().cumsum(0)[:, None]) ** 2)}


def make_variant(name):
    config = GPTConfig(n_head=H, n_embd=H * D)
    if name == "bam":
        var = BAM(config)
        with torch.no_grad():  # local heads and retrieval heads (beta < 0); beta = 0.1 makes P_ii large
            var.theta_beta.copy_(torch.tensor([1.3, -0.7, 0.1, 2.0]))
        return var.double()
    return {"alibi": ALiBi, "cauchy": Cauchy, "centred": Centred, "scaleinv": ScaleInvariant, "gain": Gain}[name](
        config).double()


def gradients(var, T, doc, exact, seed=0):
    """Output and gradients of (q, k, v, the variant's parameters, the SSMax scale)."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    scale = torch.linspace(0.8, 1.5, H, dtype=torch.float64, requires_grad=True)
    c = ssmax_factor(scale, B, T, 0, doc)
    if exact:
        y = attend_exact(q, k, v, var, var(T, "cpu"), derivative_tables(var, H, T, "cpu", prior_repeats(var, H)), c, doc,
                         "chunked", 64, None)
    else:
        y = attend(q, k, v, AttentionArgs(var, var(T, "cpu"), doc=doc, engine="sdpa"), ssmax=c)
    leaves = [q, k, v, *var.parameters(), scale]
    return [y] + list(torch.autograd.grad((y * torch.cos(3 * y)).sum(), leaves))


def documents(T, use_doc):
    return torch.sort(torch.randint(0, 3, (B, T), generator=torch.Generator().manual_seed(T)), dim=1).values \
        if use_doc else None


@pytest.mark.parametrize("name", ["bam", "cauchy", "centred"])
@pytest.mark.parametrize("use_doc", [False, True])
@pytest.mark.parametrize("T", [1, 37, 130, 1000])
def test_route_gives_the_gradients_of_autograd_through_sdpa(name, use_doc, T):
    var = make_variant(name)
    assert route_problem(var, H) is None
    doc = documents(T, use_doc)
    want, got = gradients(var, T, doc, exact=False), gradients(var, T, doc, exact=True)
    labels = ["out", "q", "k", "v", *(n for n, _ in var.named_parameters()), "ssmax scale"]
    for label, a, b in zip(labels, got, want):
        error = ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
        assert error < TOLERANCE, f"{label}: relative error {error:.1e}"
    if T > 1:  # the prior and SSMax gradients are really there
        assert all(g.abs().min() > 0 for g in want[4:])


@pytest.mark.parametrize("use_doc", [False, True])
@pytest.mark.parametrize("T, q_offset", [(1, 0), (130, 0), (300, 0), (130, 129), (300, 77)])
def test_flex_runs_the_passes_as_chunked_does(use_doc, T, q_offset):
    """The route's forward passes through flex (eager on the CPU, GQA-stacked heads) equal chunked's,
    for every query or for the queries from q_offset on."""
    var = make_variant("bam")
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    q = q[:, :, q_offset:]
    doc = documents(T, use_doc)
    c = ssmax_factor(torch.linspace(0.8, 1.5, H, dtype=torch.float64), B, T - q_offset, q_offset, doc)
    tables = {key: t.detach() for key, t in var(T, "cpu").items()}
    with_c = make_score_mod(var, tables, c, q_offset)

    def score_mod(s, b, h, q_idx, kv):
        return s + with_c(0.0, b, h, q_idx, kv)

    derivatives = [prior_table(var, tables, H, T)] + [g for _, g in derivative_tables(var, H, T, "cpu")]
    mask = flex_block_mask(B, T - q_offset, T, q_offset, doc, "cpu")
    results = []
    for engine in ("flex", "chunked"):
        out, lse = attend_with_lse(q, k, v, score_mod, engine, doc, 64, mask, q_offset)
        results.append((out, lse, gradient_weights(q, k, v, out, lse, score_mod, derivatives, engine, doc, 64, mask,
                                                   q_offset)))
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_a_per_layer_prior_in_a_whole_model(monkeypatch):
    """GPT with one BAM prior per layer, SSMax and documents: the route (chunked engine) gives
    the loss and every parameter's gradient of autograd through sdpa (--prior-grad table)."""
    calls = []
    monkeypatch.setattr(engines, "attend_exact", lambda *args: calls.append(args[3]) or attend_exact(*args))
    idx = torch.randint(1, 64, (2, 150), generator=torch.Generator().manual_seed(0))
    idx[:, 60] = 0
    grads = []
    for engine in ("chunked", "sdpa"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(attention="bam", prior_per_layer=True, n_layer=3, n_head=H, n_embd=H * D, vocab_size=64,
                              engine=engine, attn_block=64, prior_grad="passes" if engine == "chunked" else "table")).double()
        with torch.no_grad():
            for i, prior in enumerate(model.positional):
                prior.theta_beta.copy_(torch.tensor([1.3, -0.7, 0.1, 2.0]) + 0.2 * i)
        assert model.exact_prior_grad == (engine == "chunked")
        loss = model(idx, idx, doc=torch.cumsum(idx == 0, dim=1))[1]
        loss.backward()
        grads.append([loss] + [p.grad for p in model.parameters()])
        if engine == "chunked":  # each layer took the route, with its own prior; sdpa never does
            assert calls == list(model.positional)
    assert len(calls) == 3
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert all(p.grad.abs().min() > 0 for p in model.positional.parameters())


@pytest.mark.parametrize("variant, problem", [(SharedWidth, "has shape (1,), not one value per head"),
                                              (MixedHeads, "log_width moves the prior of other heads too")])
def test_variants_the_route_cannot_take_fall_back_and_say_so(monkeypatch, capsys, variant, problem):
    monkeypatch.setitem(__import__("attention").VARIANTS, "custom", variant)
    assert problem in route_problem(variant(GPTConfig(n_head=H, n_embd=H * D)), H)
    model = GPT(GPTConfig(attention="custom", n_layer=1, n_head=H, n_embd=H * D, vocab_size=64, engine="chunked"))
    assert "--prior-grad passes does not apply to custom" in capsys.readouterr().out
    assert not model.exact_prior_grad
    idx = torch.randint(64, (1, 40))
    model(idx, idx)[1].backward()
    assert model.positional[0].log_width.grad.abs().sum() > 0


def test_scaleinv_with_ssmax_falls_back_and_nothing_trained_takes_the_plain_path(capsys):
    scaleinv = GPT(GPTConfig(attention="scaleinv", ssmax=True, n_layer=1, n_head=H, n_embd=H * D, vocab_size=64))
    assert not scaleinv.exact_prior_grad and "not additive" in capsys.readouterr().out
    for name in ("nope", "alibi"):  # no prior parameter, no SSMax: nothing for the route to do
        assert not GPT(GPTConfig(attention=name, n_layer=1, n_head=H, n_embd=H * D, vocab_size=64)).exact_prior_grad
    assert GPT(GPTConfig(attention="bam", prior_grad="table", n_layer=1, n_head=H, n_embd=H * D)).exact_prior_grad \
        is False


def test_a_parameter_whose_derivative_is_the_prior_shares_its_pass(monkeypatch):
    """BAM's df/dtheta_alpha is f itself (as Centred's df/dlog_a): with SSMax the extra pass stacks 2
    quantities per head, not 3. The gradients stay autograd's: the route test above drops the repeats."""
    assert prior_repeats(make_variant("bam"), H) == ("theta_alpha",)
    assert prior_repeats(make_variant("centred"), H) == ("log_a",) and prior_repeats(make_variant("cauchy"), H) == ()
    stacked = []
    monkeypatch.setattr(prior_grad, "attend_with_lse", lambda q, *a: stacked.append(q.shape[1]) or attend_with_lse(q, *a))
    gradients(make_variant("bam"), 37, None, exact=True)
    assert stacked == [H, 2 * H]  # the attention itself, then f (SSMax and theta_alpha) and g of theta_beta


def test_the_route_refuses_a_variant_that_is_not_additive():
    config = GPTConfig(attention="scaleinv", n_head=H, n_embd=H * D)
    variant = ScaleInvariant(config)
    q = torch.randn(1, H, 10, D)
    with pytest.raises(ValueError, match="cannot take ScaleInvariant: its score is not additive"):
        attend_exact(q, q, q, variant, variant(10, "cpu"), [], None, None, "chunked", 64, None)


def test_fp16_outputs_stay_finite_where_c_times_w_passes_fp16s_range():
    """Values near fp16's range and a large SSMax factor: c W passes 65504. The route adds nothing to
    the forward (its output is attention's), and its gradients, reduced in float32, are finite."""
    var = make_variant("bam").float()
    T = 300
    torch.manual_seed(0)
    q, k = torch.randn(2, B, H, T, D, dtype=torch.float16)
    v = (2e4 * torch.randn(B, H, T, D).clamp(-2, 2)).half()
    scale = torch.full((H,), 8.0, requires_grad=True)
    c = ssmax_factor(scale, B, T, 0, None)
    derivatives = derivative_tables(var, H, T, "cpu", prior_repeats(var, H))
    y = attend_exact(q, k, v, var, var(T, "cpu"), derivatives, c, None, "chunked", 64, None)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    plain = attend(q, k, v, AttentionArgs(var, {key: t.detach() for key, t in var(T, "cpu").items()}, engine="chunked", block=64), ssmax=c.detach())
    # the route folds c (~45 here) into fp16 q: its logits round otherwise than chunked's float32 ones
    assert (y.float() - plain.float()).abs().max() < 3e-2 * plain.float().abs().max()
    grads = torch.autograd.grad((y.float() * 1e-4).sum(), [scale, *var.parameters()])
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("logits_at", [None, [40, 97, 149]])
@pytest.mark.parametrize("use_doc", [False, True])
def test_a_forward_without_targets_under_autograd_places_the_last_layers_queries(monkeypatch, logits_at, use_doc):
    """model(idx) with gradients on and no targets (the logits of the last position, or of
    logits_at: a user differentiating a logit): the last layer computes its queries from the first
    scored position on, and the route must give them their true positions. The logits and every
    gradient equal those of autograd through sdpa (--prior-grad table)."""
    calls = []
    monkeypatch.setattr(engines, "attend_exact", lambda *args, **kw: calls.append(1) or attend_exact(*args, **kw))
    idx = torch.randint(1, 64, (2, 150), generator=torch.Generator().manual_seed(0))
    idx[:, 60] = 0
    doc = torch.cumsum(idx == 0, dim=1) if use_doc else None
    at = None if logits_at is None else torch.tensor(logits_at)
    results = []
    for engine in ("chunked", "sdpa"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(attention="bam", n_layer=2, n_head=H, n_embd=H * D, vocab_size=64, engine=engine,
                              attn_block=64, prior_grad="passes" if engine == "chunked" else "table")).double()
        with torch.no_grad():
            model.positional[0].theta_beta.copy_(torch.tensor([1.3, -0.7, 0.1, 2.0]))
        logits = model(idx, doc=doc, logits_at=at)[0]
        (logits * torch.cos(logits)).sum().backward()
        results.append([logits] + [p.grad for p in model.parameters()])
    assert len(calls) == 2  # both layers of the chunked model took the route
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert all(p.grad.abs().min() > 0 for p in model.positional.parameters())


# ----------------------------------------------------------------------------------------
# engines/diagonal.py: sdpa's fused CPU kernel, the bias's gradient summed along its diagonals

def diagonal_gradients(var, T, doc, diagonal, use_ssmax):
    """Output and gradients of (q, k, v, the variant's parameters[, the SSMax scale]) through
    engines/diagonal.py, or autograd through sdpa's bias (chunked's logits for an affine prior: sdpa
    computes those in float32)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    scale = torch.linspace(0.8, 1.5, H, dtype=torch.float64, requires_grad=True)
    c = ssmax_factor(scale, B, T, 0, doc) if use_ssmax else None
    engine = "sdpa" if diagonal or var.additive else "chunked"
    y = attend(q, k, v, AttentionArgs(var, var(T, "cpu"), doc=doc, engine=engine, diagonal=diagonal), ssmax=c)
    leaves = [q, k, v, *var.parameters()] + [scale] * use_ssmax
    return [y] + list(torch.autograd.grad((y * torch.cos(3 * y)).sum(), leaves))


@pytest.mark.parametrize("name", ["bam", "alibi", "cauchy", "centred", "scaleinv", "gain"])
@pytest.mark.parametrize("use_doc", [False, True])
@pytest.mark.parametrize("T, use_ssmax", [(1, True), (37, True), (37, False), (130, True), (1024, True), (1024, False)])
def test_diagonal_route_gives_the_gradients_of_autograd_through_sdpa(name, use_doc, T, use_ssmax):
    """Any additive prior (a centre that moves too; ALiBi, which nothing trains, on the kernel's own backward
    without SSMax) and affine ones (scaleinv's fixed a S + m, and one
    that trains both tables), with and without SSMax and documents, over one query tile (37), tiles
    and a remainder (130) and sixteen tiles (1024)."""
    var = make_variant(name)
    doc = documents(T, use_doc)
    want, got = (diagonal_gradients(var, T, doc, diagonal, use_ssmax) for diagonal in (False, True))
    labels = ["out", "q", "k", "v", *(n for n, _ in var.named_parameters()), "ssmax scale"]
    for label, a, b in zip(labels, got, want):
        error = ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
        assert error < TOLERANCE, f"{label}: relative error {error:.1e}"
    if T > 1:
        assert all(g.abs().min() > 0 for g in want[4:])


@pytest.mark.parametrize("name", ["bam", "scaleinv", "gain"])
@pytest.mark.parametrize("use_doc", [False, True])
def test_diagonal_route_over_batch_slices(monkeypatch, name, use_doc):
    """Tiles too large for the cache run one batch row at a time: the same gradients."""
    import engines.diagonal
    monkeypatch.setattr(engines.diagonal, "CACHED", 1)
    test_diagonal_route_gives_the_gradients_of_autograd_through_sdpa(name, use_doc, 130, True)


@pytest.mark.parametrize("name", ["bam", "scaleinv", "gain"])
def test_diagonal_route_hands_out_nothing_in_its_kept_memory(name):
    """The tiles' buffers are kept from call to call (engines/diagonal.py's `kept`): a call's output
    and gradients stay what they were while later calls, longer and shorter, reuse that memory."""
    var = make_variant(name)
    first = diagonal_gradients(var, 130, None, True, True)
    saved = [x.clone() for x in first]
    for T in (300, 37):
        diagonal_gradients(var, T, documents(T, True), True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, saved))


@pytest.mark.parametrize("name", ["bam", "scaleinv"])
def test_cpu_training_on_sdpa_takes_the_diagonal_route(monkeypatch, name):
    """GPT on a CPU (sdpa, documents; bam with SSMax, scaleinv with p-RoPE) trains through
    engines/diagonal.py by default, in every layer, with the loss and gradients of autograd through
    sdpa's bias (bam, --prior-grad table) or chunked's logits (scaleinv: sdpa computes them in
    float32); never in evaluation."""
    import model as model_module
    calls = []
    monkeypatch.setattr(model_module, "diagonal_attention", lambda *a: calls.append(1) or diagonal_attention(*a))
    idx = torch.randint(1, 64, (2, 150), generator=torch.Generator().manual_seed(0))
    idx[:, 60] = 0
    doc = torch.cumsum(idx == 0, dim=1)
    grads = []
    for prior_grad in ("auto", "table"):
        torch.manual_seed(0)
        reference = "sdpa" if name == "bam" else "chunked"
        model = GPT(GPTConfig(attention=name, n_layer=3, n_head=H, n_embd=H * D, vocab_size=64, prior_grad=prior_grad,
                              engine="auto" if prior_grad == "auto" else reference)).double()
        loss = model(idx, idx, doc=doc)[1]
        loss.backward()
        grads.append([loss] + [p.grad for p in model.parameters()])
    assert len(calls) == 3
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        model(idx, idx, doc=doc)
    assert len(calls) == 3
