"""Positional variants against their papers' formulas (README, "The variants") in float64, and the
three engines against each other."""
import math

import pytest
import torch

from attention import (VARIANTS, AttentionArgs, alibi_slopes, make_score_mod, positions_in_document,
                       rotary_frequencies, ssmax_factor)
from model import GPTConfig, attend

torch.manual_seed(0)
ENGINES = ("sdpa", "chunked", "flex")


def variant(name, n_head=4, **overrides):
    return VARIANTS[name](GPTConfig(attention=name, n_head=n_head, n_embd=16 * n_head, **overrides))


# ---------------------------------------------------------------- formulas (README, "The variants"), float64

def reference_logit(name, S, h, i, j, H, n_i=None, alpha=None, beta=None, s_h=None, tau=10.0):
    """The papers' logit in float64, for query i and key j <= i; scalars or broadcastable tensors
    (alpha, beta and s_h per head). Written from the paper, sharing nothing with attention.py."""
    S, h, t = (torch.as_tensor(x, dtype=torch.float64) for x in (S, h, i - j))
    t = t.clamp(min=0)  # the causal part; the caller masks j > i
    if name == "nope":
        L = S
    elif name == "alibi":
        L = S - 2 ** (-8 * (h + 1) / H) * t
    elif name == "bam":
        alpha, beta = (torch.as_tensor(x, dtype=torch.float64) for x in (alpha, beta))
        L = S - torch.exp(alpha) * ((t - 0.0).abs() + 1e-5) ** beta
    elif name == "scaleinv":
        a = torch.sqrt(2 * torch.log(t / tau + 1) + 1)
        m = -2 * torch.log(t / tau + 1)
        L = a * S + m
    if s_h is not None:
        L = L * torch.as_tensor(s_h, dtype=torch.float64) * torch.log(torch.as_tensor(n_i, dtype=torch.float64))
    return L


def code_logit(v, S, h, i, j, n, ssmax=None, q_offset=0):
    tables = {key: t.double() for key, t in v(n, "cpu").items()}
    score_mod = make_score_mod(v, tables, ssmax, q_offset)
    return score_mod(torch.tensor(S, dtype=torch.float64), torch.tensor(0), torch.tensor(h),
                     torch.tensor(i - q_offset), torch.tensor(j)).item()


POINTS = [(0, 0, 0), (1, 5, 5), (2, 7, 3), (3, 100, 0), (0, 999, 998), (1, 4000, 17)]


@pytest.mark.parametrize("name", ["nope", "alibi", "scaleinv"])
def test_fixed_variants_match_papers(name):
    v = variant(name)
    for h, i, j in POINTS:
        S = 0.37 * (h + 1) - 0.01 * j
        got = code_logit(v, S, h, i, j, n=4001)
        want = reference_logit(name, S, h, i, j, H=4)
        assert got == pytest.approx(want.item(), rel=1e-6, abs=1e-6), (h, i, j)


def test_scaleinv_boundary_and_large_t():
    v = variant("scaleinv")
    tables = v(200_001, "cpu")
    assert tables["a"][0].item() == 1.0 and tables["m"][0].item() == 0.0  # local tokens untouched
    t = 200_000
    assert tables["a"][t].item() == pytest.approx(math.sqrt(2 * math.log(t / 10 + 1) + 1), rel=1e-6)
    assert tables["m"][t].item() == pytest.approx(-2 * math.log(t / 10 + 1), rel=1e-6)
    v_tau = variant("scaleinv", scaleinv_tau=3.0)
    assert code_logit(v_tau, 1.5, 0, 50, 20, n=51) == pytest.approx(
        reference_logit("scaleinv", 1.5, 0, 50, 20, H=4, tau=3.0).item(), rel=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.4, -0.3, -0.9])
def test_bam_prior_matches_papers(beta):
    v = variant("bam")
    with torch.no_grad():
        v.theta_alpha.copy_(torch.tensor([-1.0, -2.0, 0.5, -4.0]))
        v.theta_beta.fill_(beta)
    for h, i, j in POINTS:
        got = code_logit(v, 0.8, h, i, j, n=4001)
        want = reference_logit("bam", 0.8, h, i, j, H=4, alpha=v.theta_alpha[h].item(), beta=beta)
        assert got == pytest.approx(want.item(), rel=1e-5), (h, i, j)


def test_bam_init_is_alibi():
    bam, alibi = variant("bam"), variant("alibi")
    for h, i, j in POINTS:
        assert code_logit(bam, 0.3, h, i, j, 4001) == pytest.approx(code_logit(alibi, 0.3, h, i, j, 4001), abs=1e-4)


def test_bam_with_ssmax_matches_papers():
    v = variant("bam")
    with torch.no_grad():
        v.theta_beta.copy_(torch.tensor([1.0, -0.5, 0.2, -1.2]))
    s = torch.tensor([1.0, 1.3, 0.7, 2.0], dtype=torch.float64)
    ssmax = ssmax_factor(s, 1, 4001, 0, None).double()
    for h, i, j in POINTS:
        got = code_logit(v, 0.8, h, i, j, n=4001, ssmax=ssmax)
        want = reference_logit("bam", 0.8, h, i, j, H=4, alpha=v.theta_alpha[h].item(),
                               beta=v.theta_beta[h].item(), s_h=s[h].item(), n_i=i + 1)
        assert got == pytest.approx(want.item(), rel=1e-5, abs=1e-9), (h, i, j)


def test_ssmax_counts_keys_inside_the_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_in_document(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    factor = ssmax_factor(torch.tensor([2.0]), 1, 9, 0, doc)
    assert torch.allclose(factor[0, 0], 2.0 * torch.log(torch.tensor([1., 2, 3, 1, 2, 1, 2, 3, 4])))


def test_alibi_slopes():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -k for k in range(1, 9)])
    assert alibi_slopes(16).tolist() == pytest.approx([2 ** (-k / 2) for k in range(1, 17)])
    # 12 heads: the 8 slopes of H=8, then every other slope of H=16 (the ALiBi repo's rule)
    want12 = [2 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    assert alibi_slopes(12).tolist() == pytest.approx(want12)


def test_prope_rotates_only_the_highest_frequencies():
    inv_freq = rotary_frequencies(64, 10000.0, 0.75)
    assert (inv_freq[:24] > 0).all() and (inv_freq[24:] == 0).all()
    assert inv_freq[0] == 1.0 and torch.all(inv_freq[:24][1:] < inv_freq[:24][:-1])
    assert (rotary_frequencies(64, 10000.0, 1.0) > 0).all()


# ---------------------------------------------------------------- engines agree

SSMAX_SCALE = [1.2, 0.8]  # s_h of the random cases' two heads


def papers_logits(name, var, use_ssmax, doc):
    """logits(S, h, i, j) of one variant from its paper (README, "The variants"), with var's learned
    parameters and, if use_ssmax, SSMax's s_h log n_i, n_i counted here: the keys query i sees in its document."""
    params = {}
    if name == "bam":
        params = dict(alpha=var.theta_alpha.detach().double().view(1, -1, 1, 1),
                      beta=var.theta_beta.detach().double().view(1, -1, 1, 1))

    def logits(S, h, i, j):
        H, T = S.shape[1], S.shape[-1]
        if use_ssmax:
            same_doc = torch.ones(1, T, T, dtype=torch.bool) if doc is None else doc[:, :, None] == doc[:, None, :]
            n_i = (same_doc & torch.ones(T, T, dtype=torch.bool).tril()).sum(-1)[:, None, :, None]
            params.update(n_i=n_i, s_h=torch.tensor(SSMAX_SCALE, dtype=torch.float64).view(1, -1, 1, 1))
        return reference_logit(name, S, h, i, j, H, **params)
    return logits


def reference_attention(q, k, v, logits, doc):
    """Float64 softmax attention over the whole T x T matrix, causal and inside documents."""
    B, H, T, D = q.shape
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1)
    i, j = torch.arange(T).view(1, 1, T, 1), torch.arange(T).view(1, 1, 1, T)
    S = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
    mask = i >= j
    if doc is not None:
        mask = mask & (doc[b, i] == doc[b, j])
    L = torch.where(mask, logits(S, h, i, j), float("-inf"))
    return torch.softmax(L, dim=-1) @ v.double()


def random_case(name, T, use_ssmax, use_doc, B=2, H=2, D=16):
    var = variant(name, n_head=H)
    if name == "bam":
        with torch.no_grad():
            var.theta_beta.copy_(torch.tensor([0.7, -0.4]))  # a local and a retrieval head
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    doc = torch.sort(torch.randint(0, 3, (B, T)), dim=1).values if use_doc else None
    ssmax = ssmax_factor(torch.tensor(SSMAX_SCALE), B, T, 0, doc) if use_ssmax else None
    return var, q, k, v, ssmax, doc


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("use_ssmax", [False, True])
@pytest.mark.parametrize("use_doc", [False, True])
def test_engines_agree_with_float64_reference(name, use_ssmax, use_doc):
    for T in (1, 37, 130, 1000):
        var, q, k, v, ssmax, doc = random_case(name, T, use_ssmax, use_doc)
        want = reference_attention(q, k, v, papers_logits(name, var, use_ssmax, doc), doc)
        tables = var(T, "cpu")
        for engine in ENGINES:
            with torch.no_grad():
                got = attend(q, k, v, AttentionArgs(var, tables, doc=doc, engine=engine, block=64), ssmax=ssmax)
            err = (got.double() - want).abs().max().item()
            assert err < 2e-5, f"{engine} {name} T={T} ssmax={use_ssmax} doc={use_doc}: max error {err}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_engines_agree_on_gradients(name):
    """sdpa and chunked (the CPU training engines) give the same gradients for q, k, v, the
    prior parameters and the SSMax scale."""
    T, B, H = 130, 2, 2
    grads = {}
    for engine in ("sdpa", "chunked"):
        torch.manual_seed(1)
        var, q, k, v, _, doc = random_case(name, T, False, True)
        scale = torch.tensor(SSMAX_SCALE, requires_grad=True)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        ssmax = ssmax_factor(scale, B, T, 0, doc)
        out = attend(q, k, v, AttentionArgs(var, var(T, "cpu"), doc=doc, engine=engine, block=48), ssmax=ssmax)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[engine] = [q.grad, k.grad, v.grad, scale.grad] + [p.grad for p in var.parameters()]
    for a, b in zip(grads["sdpa"], grads["chunked"]):
        assert a is not None and torch.allclose(a, b, atol=2e-5, rtol=1e-4)
    if name == "bam":
        assert all(g.abs().sum() > 0 for g in grads["sdpa"][4:])


def test_kv_offset_matches_full_attention():
    """Queries at the end of a longer key sequence (the KV-cache case) see true positions."""
    for name in VARIANTS:
        var, q, k, v, ssmax, _ = random_case(name, 50, True, False)
        tables = var(50, "cpu")
        full = attend(q, k, v, AttentionArgs(var, tables, engine="sdpa"), ssmax=ssmax)
        for engine in ENGINES:
            with torch.no_grad():
                tail = attend(q[:, :, 45:], k, v, AttentionArgs(var, tables, engine=engine, block=16), ssmax=ssmax[:, :, 45:], q_offset=45)
            assert torch.allclose(tail, full[:, :, 45:], atol=1e-5), (name, engine)


def test_flex_refuses_backward_off_cuda():
    var, q, k, v, _, _ = random_case("alibi", 8, False, False)
    with pytest.raises(RuntimeError, match="no backward off CUDA"):
        attend(q.requires_grad_(), k, v, AttentionArgs(var, var(8, "cpu"), engine="flex"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_on_cuda_matches_chunked():
    for name in VARIANTS:
        var, q, k, v, ssmax, doc = random_case(name, 1000, name == "bam", True)
        var, q, k, v, doc = var.cuda(), q.cuda(), k.cuda(), v.cuda(), doc.cuda()
        ssmax = None if ssmax is None else ssmax.cuda()
        tables = var(1000, "cuda")
        with torch.no_grad():
            a = attend(q, k, v, AttentionArgs(var, tables, doc=doc, engine="flex"), ssmax=ssmax)
            b = attend(q, k, v, AttentionArgs(var, tables, doc=doc, engine="chunked"), ssmax=ssmax)
        assert torch.allclose(a, b, atol=1e-3), name


def test_a_new_prior_is_one_module_and_one_registry_line(monkeypatch):
    """A per-head Cauchy prior, b_h(t) = -log(1 + (t / w_h)^2), added as README's "Adding a prior" says: one
    module, one registry line; every engine, trains."""
    import torch.nn as nn
    from attention import prior_score

    class Cauchy(nn.Module):
        additive = True
        score = staticmethod(prior_score)

        def __init__(self, config):
            super().__init__()
            self.log_width = nn.Parameter(torch.zeros(config.n_head))

        def forward(self, n, device):
            t = torch.arange(n, device=device, dtype=torch.float32)
            return {"prior": -torch.log1p((t / self.log_width.exp()[:, None]) ** 2)}

    monkeypatch.setitem(VARIANTS, "cauchy", Cauchy)
    var, q, k, v, ssmax, doc = random_case("nope", 70, True, True)
    var = variant("cauchy", n_head=2)
    width = var.log_width.detach().double().exp().view(1, -1, 1, 1)
    cauchy = papers_logits("nope", var, True, doc)  # S + SSMax, then the Cauchy prior as defined above
    want = reference_attention(q, k, v, lambda S, h, i, j: cauchy(S - torch.log1p(((i - j) / width) ** 2), h, i, j), doc)
    for engine in ENGINES:
        with torch.no_grad():
            got = attend(q, k, v, AttentionArgs(var, var(70, "cpu"), doc=doc, engine=engine, block=32), ssmax=ssmax)
        assert (got.double() - want).abs().max() < 2e-5, engine
    attend(q, k, v, AttentionArgs(var, var(70, "cpu"), engine="sdpa")).sum().backward()
    assert var.log_width.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("use_ssmax", [False, True])
@pytest.mark.parametrize("use_doc", [False, True])
def test_inference_tiles_equal_float64_reference(name, use_ssmax, use_doc, monkeypatch):
    """chunked without autograd runs chunked.toeplitz_attention (the bias a view of the tables) and
    equals the float64 reference at awkward lengths and tiles, queries at the end of the keys too."""
    from engines import chunked
    calls = []
    monkeypatch.setattr("engines.toeplitz_attention", lambda *a: calls.append(1) or chunked.toeplitz_attention(*a))
    for T, block, q_offset in ((1, 7, 0), (37, 7, 0), (130, 48, 0), (300, 64, 0), (130, 48, 77), (300, 1000, 299)):
        var, q, k, v, ssmax, doc = random_case(name, T, use_ssmax, use_doc)
        var, q, k, v = var.double(), q.double(), k.double(), v.double()
        if use_ssmax:
            ssmax = ssmax_factor(torch.tensor(SSMAX_SCALE, dtype=torch.float64), 2, T, 0, doc)[:, :, q_offset:]
        want = reference_attention(q, k, v, papers_logits(name, var, use_ssmax, doc), doc)[:, :, q_offset:]
        tables = {key: t.double() for key, t in var(T, "cpu").items()}
        if name == "scaleinv":  # its tables are float32 (no parameter to take float64 from): the same in float64
            log_t = torch.log1p(torch.arange(T, dtype=torch.float64) / var.tau)
            tables = {"a": torch.sqrt(2 * log_t + 1), "m": -2 * log_t}
        with torch.no_grad():
            got = attend(q[:, :, q_offset:], k, v, AttentionArgs(var, tables, doc=doc, engine="chunked", block=block), ssmax=ssmax, q_offset=q_offset)
        assert got.dtype == torch.float64
        err = (got - want).abs().max().item()
        assert err < 1e-10, f"{name} T={T} block={block} q_offset={q_offset}: max error {err}"
    assert len(calls) == 6


def test_a_score_that_is_not_affine_in_s_runs_through_the_score_function():
    """A non-additive variant that does not declare `affine` (here a soft-capped logit) takes the
    generic paths, score function on the grids, in every engine, and equals the float64 formula."""
    import torch.nn as nn
    from attention import distance

    class SoftCap(nn.Module):
        additive = False

        def __init__(self, config):
            super().__init__()

        def forward(self, n, device):
            return {"slope": torch.full((n,), 0.1, device=device)}

        @staticmethod
        def score(s, b, h, q, kv, tables):
            return 5 * torch.tanh(s / 5) - tables["slope"][distance(q, kv)] * distance(q, kv)

    var = SoftCap(None)
    _, q, k, v, _, doc = random_case("nope", 130, False, True)
    want = reference_attention(q, k, v, lambda S, h, i, j: 5 * torch.tanh(S / 5) - 0.1 * (i - j).clamp(min=0), doc)
    for engine in ENGINES:
        with torch.no_grad():
            got = attend(q, k, v, AttentionArgs(var, var(130, "cpu"), doc=doc, engine=engine, block=48))
        assert (got.double() - want).abs().max() < 2e-5, engine


def indexed_attention(q, k, v, prior, scale, ssmax, doc, q_offset):
    """What chunked.toeplitz_attention computes, by plain indexing in float64: logits
    c_i (a[h, t] S_ij + f[h, t]), t = i - j, over the whole Tq x Tk matrix, causal and inside documents."""
    B, H, Tq, D = q.shape
    i, j = torch.arange(Tq)[:, None] + q_offset, torch.arange(k.shape[2])[None, :]
    t = (i - j).clamp(min=0)
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
    if scale is not None:
        logits = logits * scale.double()[:, t]
    if prior is not None:
        logits = logits + prior.double()[:, t]
    if ssmax is not None:
        logits = logits * ssmax.double()[..., None]
    mask = (i >= j)[None, None]
    if doc is not None:
        mask = mask & (doc[:, i] == doc[:, j])[:, None]
    return torch.softmax(torch.where(mask, logits, float("-inf")), dim=-1) @ v.double()


@pytest.mark.parametrize("H", [1, 2, 3, 4, 12])
@pytest.mark.parametrize("kind", ["none", "additive", "affine"])
@pytest.mark.parametrize("use_ssmax, use_doc", [(False, False), (True, False), (False, True), (True, True)])
def test_toeplitz_views_equal_plain_indexing(H, kind, use_ssmax, use_doc):
    """The inference tiles' as_strided views of the distance tables against the tables indexed
    entry by entry: odd lengths and tiles, a batch of 3, queries at the end of the keys, and
    inputs laid out as the model gives them (q, k, v permuted views of one projection; tables
    that are transposed or expanded views)."""
    from engines.chunked import toeplitz_attention
    gen = torch.Generator().manual_seed(H)
    B, D = 3, 8
    for Tk, q_offset, block in ((1, 0, 5), (37, 0, 7), (37, 36, 5), (129, 0, 64), (129, 50, 33), (301, 0, 1000)):
        Tq = Tk - q_offset
        qkv = torch.randn(B, Tk, 3, H, D, generator=gen, dtype=torch.float64)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, Tk, D), not contiguous
        q = q[:, :, q_offset:]
        prior = None if kind == "none" else -torch.rand(Tk, H, generator=gen, dtype=torch.float64).cumsum(0).T
        scale = None if kind != "affine" else (1 + torch.rand(Tk, generator=gen, dtype=torch.float64)).expand(H, Tk)
        doc = torch.sort(torch.randint(0, 4, (B, Tk), generator=gen), dim=1).values if use_doc else None
        scale_h = 0.5 + torch.rand(H, generator=gen, dtype=torch.float64)  # SSMax: one row for the batch without documents
        ssmax = ssmax_factor(scale_h, B, Tq, q_offset, doc) if use_ssmax else None
        want = indexed_attention(q, k, v, prior, scale, ssmax, doc, q_offset)
        with torch.no_grad():
            got = toeplitz_attention(q, k, v, prior, scale, ssmax, doc, q_offset, block)
        err = (got - want).abs().max().item()
        assert got.shape == (B, H, Tq, D) and err < 1e-10, f"Tk={Tk} q_offset={q_offset} block={block}: max error {err}"
