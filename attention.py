"""
Positional variants and the engines that run them.

The prior contract. A positional variant (a prior) is any nn.Module with

    forward(n, device) -> tables       a dict of tensors over the distance t = 0..n-1, made from its
                                       parameters (differentiable: gradients reach them through it)
    score(s, b, h, q, kv, tables)      FlexAttention's score_mod signature plus the tables: the logit
                                       of query position q, key position kv, from s = q.k / sqrt(d)
    additive                           True when score = s + f(h, t): sdpa passes f as a bias
    affine (optional)                  True when score = a(h, t) s + f(h, t): the inference tiles
                                       build a and f once per call

The score may depend on s, the head h and the distance t = q - kv only: not on the batch row b, the
content, or an absolute position. Every engine relies on it (sdpa and chunked build one bias for the
whole batch, the inference tiles one table row per distance), and GPT refuses, when it is built, a
variant that breaks it (contract_problem). The model leaves a prior alone: its parameters keep the
init its class gives them and never get weight decay, and `prior_per_layer` gives every layer its
own. The same function runs in three engines, which model.attend calls:

    sdpa     F.scaled_dot_product_attention (here): flash for plain causal attention, a computed
             additive bias for additive variants, explicit logits for the others (scaleinv)
    flex     FlexAttention with a causal (+ document) block mask (engines/flex.py); fused and compiled on CUDA
    chunked  tiles on any device, memory linear in T (engines/chunked.py): with autograd an online softmax
             over query x key tiles; without, one fused sdpa call per query tile on a view of the tables

SSMax (scalable softmax) multiplies any variant's logits by s_h * log(n_i) afterwards: a factor per
query row, made in the attention layer, not in the variant. The formulas are those of the README's
"The variants" section.

Adding a prior: write a module whose forward(n, device) returns {"prior": H x n tensor of
b_h(t)} with `score = staticmethod(prior_score)`, and register it in VARIANTS (README, "Adding a prior").
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6):
    raise ImportError(f"torch {torch.__version__} is too old: FlexAttention training needs torch >= 2.6 "
                      f"(./setup.sh installs torch==2.13.0)")


def distance(q, kv):
    # t = i - j, clamped at 0: score functions are also evaluated on masked (future) entries,
    # and a negative table index there is an illegal memory access on CUDA
    return (q - kv).clamp(min=0)


def prior_score(s, b, h, q, kv, tables):
    """Additive positional log-prior: logit = S + b_h(t)."""
    return s + tables["prior"][h, distance(q, kv)]


def alibi_slopes(n_head):
    """ALiBi slopes m_h = 2^(-8h/H); for H not a power of two, the ALiBi repo's rule."""
    def powers(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]
    p = 2 ** math.floor(math.log2(n_head))
    slopes = powers(p) + powers(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes, dtype=torch.float32)


class NoPE(nn.Module):
    """No positional signal: the causal mask only."""
    additive = True  # score(s) = s + f(h, t): the sdpa engine can pass f as a bias

    def __init__(self, config):
        super().__init__()

    def forward(self, n, device):
        return {}

    @staticmethod
    def score(s, b, h, q, kv, tables):
        return s


class ALiBi(nn.Module):
    """Linear bias: logit = S - m_h * t, fixed slopes."""
    additive = True
    score = staticmethod(prior_score)

    def __init__(self, config):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)

    def forward(self, n, device):
        t = torch.arange(n, device=device, dtype=torch.float32)
        return {"prior": -self.slopes[:, None] * t}


class BAM(nn.Module):
    """Bayesian Attention Mechanism: a learned Generalized-Gaussian prior per head.

    b_h(t) = -exp(theta_alpha_h) * (|t - mu_h| + eps) ** theta_beta_h,  mu_h = 2 sinh(theta_mu_h)
    theta_beta is unconstrained: beta < 0 gives 'retrieval' heads. Init: alpha = ALiBi slope,
    beta = 1 (the prior starts as ALiBi). theta_mu is fixed at 0 (mu = 0).
    """
    additive = True
    score = staticmethod(prior_score)
    eps = 1e-5

    def __init__(self, config):
        super().__init__()
        self.theta_alpha = nn.Parameter(alibi_slopes(config.n_head).log())
        self.theta_beta = nn.Parameter(torch.ones(config.n_head))
        self.register_buffer("theta_mu", torch.zeros(config.n_head))

    def forward(self, n, device):
        dtype = torch.promote_types(self.theta_alpha.dtype, torch.float32)  # float32, float64 in float64 tests
        t = torch.arange(n, device=device, dtype=dtype)
        mu = (self.theta_mu.exp() - (-self.theta_mu).exp())[:, None]
        alpha, beta = self.theta_alpha.to(dtype).exp()[:, None], self.theta_beta.to(dtype)[:, None]
        return {"prior": -alpha * ((t - mu).abs() + self.eps) ** beta}


class ScaleInvariant(nn.Module):
    """Scale-invariant attention: L = a_t * S + m_t, nothing trained.

    a_t = sqrt(2 log(t/tau + 1) + 1), m_t = -2 log(t/tau + 1)   (the scale-invariant attention
    paper's p-RoPE + scale-invariant logits; README, "The variants"; a_0 = 1, m_0 = 0)
    """
    additive = False
    affine = True  # score(s) = a_t s + m_t: the engines may build a and m once per call

    def __init__(self, config):
        super().__init__()
        self.register_buffer("tau", torch.tensor(config.scaleinv_tau), persistent=False)

    def forward(self, n, device):
        dtype = torch.promote_types(self.tau.dtype, torch.float32)  # float32, float64 in float64 tests
        log_t = torch.log1p(torch.arange(n, device=device, dtype=dtype) / self.tau.to(device, dtype))
        return {"a": torch.sqrt(2 * log_t + 1), "m": -2 * log_t}

    @staticmethod
    def score(s, b, h, q, kv, tables):
        t = distance(q, kv)
        return s * tables["a"][t] + tables["m"][t]


VARIANTS = {"nope": NoPE, "alibi": ALiBi, "bam": BAM, "scaleinv": ScaleInvariant}
ENGINES = ("auto", "sdpa", "flex", "chunked")


# where contract_problem probes a score: the first positions, and the same distances far out (long
# evaluation goes to hundreds of thousands of positions)
PROBE_OFFSETS = (0, 8, 1_000, 10_000, 100_000, 1_000_000)


def contract_problem(variant, n_head, n=8):
    """How the variant breaks the prior contract (module docstring), or None. Its score is probed on
    random logits over an n x n block of queries q and keys kv, at positions 0..n-1 of batch row 0
    with tables built for n distances, and at the same distances in batch row 1, shifted to every
    offset of PROBE_OFFSETS, with tables built for 16 n: every probe must agree. A score that reads
    the batch row or an absolute position (content, gates, progressive interpolation, tables that
    change with the length) would be right on flex and silently wrong on sdpa and chunked, which
    share one bias over the batch and one table row per distance, and in a KV cache."""
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    h = torch.arange(n_head)[:, None, None]
    s = torch.randn(n_head, n, n, generator=torch.Generator().manual_seed(0))
    causal = (q >= kv).expand(n_head, n, n)
    try:
        with torch.no_grad():
            here = torch.as_tensor(variant.score(s, torch.tensor(0), h, q, kv, variant(n, torch.device("cpu"))))
            longer = variant(16 * n, torch.device("cpu"))
            for offset in PROBE_OFFSETS:
                elsewhere = torch.as_tensor(variant.score(s, torch.tensor(1), h, q + offset, kv + offset, longer))
                if not torch.allclose(here.expand(n_head, n, n)[causal], elsewhere.expand(n_head, n, n)[causal],
                                      rtol=1e-5, atol=1e-6):
                    return (f"its score at positions {offset}..{offset + n - 1} differs from the same distances at "
                            f"0..{n - 1}: it changes with the batch row, the absolute position or the length, not "
                            f"only with the distance")
    except (IndexError, RuntimeError) as e:
        return f"its score failed at batch row 1 or at positions beyond {n - 1} ({str(e).splitlines()[0]})"
    return None


# ----------------------------------------------------------------------------------------
# per-row factors: SSMax and document positions

def positions_in_document(doc):
    """Position of each token since the start of its document, from (B, T) document ids."""
    T = doc.shape[1]
    idx = torch.arange(T, device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values


def ssmax_factor(scale, batch, n_query, q_offset, doc):
    """SSMax: c[b, h, i] = s_h * log(n_i), n_i = keys query i sees (counted inside its document)."""
    if doc is None:
        n = torch.arange(q_offset + 1, q_offset + n_query + 1, device=scale.device).expand(batch, -1)
    else:
        n = positions_in_document(doc)[:, q_offset:] + 1
    dtype = torch.promote_types(scale.dtype, torch.float32)
    return scale.to(dtype)[None, :, None] * torch.log(n.to(dtype))[:, None, :]


def distance_table(variant, tables, n_head, n, device, s=0.0):
    """The variant's score of logit s at every (head, distance t < n), (H, n): at s = 0 the prior
    f[h, t] that an additive variant adds."""
    h, t = torch.arange(n_head, device=device)[:, None], torch.arange(n, device=device)[None, :]
    return torch.as_tensor(variant.score(s, 0, h, t, 0, tables), device=device).expand(n_head, n)


def affine_tables(variant, tables, n_head, n, device):
    """(f, a) with score(s) = a[h, t] s + f[h, t] (a None for an additive variant), or None for a
    variant that does not say its score is affine in s (class attribute `affine`)."""
    if not variant.additive and not getattr(variant, "affine", False):
        return None
    f = distance_table(variant, tables, n_head, n, device)
    return f, None if variant.additive else distance_table(variant, tables, n_head, n, device, 1.0) - f


def make_score_mod(variant, tables, ssmax, q_offset):
    """The full score function of one attention call, in FlexAttention's signature.
    q arrives as the local query index; the variant sees absolute positions."""
    def score_mod(s, b, h, q, kv):
        s = variant.score(s, b, h, q + q_offset, kv, tables)
        if ssmax is not None:
            s = s * ssmax[b, h, q]
        return s
    return score_mod


def document_ids(idx, eot):
    """Document id of every token: each end-of-text token starts a new document."""
    return torch.cumsum(idx == eot, dim=1)


# ----------------------------------------------------------------------------------------
# what an attention call is given, and the sdpa engine

def index_grids(B, H, q_range, k_range, device, doc):
    # without documents every batch row scores alike: one row of the grid serves them all
    b = torch.arange(B if doc is not None else 1, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(*q_range, device=device).view(1, 1, -1, 1)
    kv = torch.arange(*k_range, device=device).view(1, 1, 1, -1)
    return b, h, q, kv


def allowed(b, q, kv, q_offset, doc):
    """Causal (+ same document) mask on index grids; q is the local query index."""
    mask = q + q_offset >= kv
    if doc is not None:
        mask = mask & (doc[b, q + q_offset] == doc[b, kv])
    return mask


def plain_attention(variant, ssmax, documents):
    """Whether attention is plain causal attention, which flash runs: no positional signal, no SSMax
    (ssmax: whether there is a factor), no documents."""
    return isinstance(variant, NoPE) and not ssmax and not documents


@dataclass
class AttentionArgs:
    """What a layer's attention call is given besides q, k, v and SSMax, made once per forward
    (model.GPT.attention_args): the variant and its tables, the document ids (B, Tk) or None, the
    engine, the chunked engine's tile size, flex's block mask (None: attend builds it), when
    engines/prior_grad.py's exact route trains the prior its derivative tables, and whether sdpa on a
    CPU runs the prior through engines/diagonal.py (an additive one on the fused kernel, an affine one
    over tiles; the bias's gradient summed along its diagonals; else autograd through T x T logits)."""
    variant: nn.Module
    tables: dict
    doc: torch.Tensor | None = None
    engine: str = "auto"
    block: int = 512
    block_mask: object = None
    derivatives: list | None = None
    diagonal: bool = False


def sdpa_attention(q, k, v, variant, tables, score_mod, ssmax, doc, q_offset):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    plain = plain_attention(variant, ssmax is not None, doc is not None)
    if plain and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if plain and Tq == 1:  # one new token against its cache: nothing to mask
        return F.scaled_dot_product_attention(q, k, v)
    b, h, qi, ki = index_grids(B, H, (0, Tq), (0, Tk), q.device, doc)
    mask = allowed(b, qi, ki, q_offset, doc)
    if variant.additive:
        # (S + f) * c = (q * c).k / sqrt(d) + f * c: fold the row factor c into q, pass f * c
        if ssmax is not None:
            q = q * ssmax[..., None].to(q.dtype)
        if not tables and doc is None and Tq == Tk:  # no prior: f c = 0, flash's causal mask (SSMax is in q)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if not tables:  # a constant mask: a bias that needs no gradient keeps sdpa on its fused kernel
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(mask, 0.0, float("-inf")).to(q.dtype))
        bias = score_mod(torch.zeros((), device=q.device), b, h, qi, ki)
        bias = torch.where(mask, bias, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    affine = affine_tables(variant, tables, H, Tk, q.device)
    if affine is None:  # any score: through the score function on the grids
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D)
        s = torch.where(mask, score_mod(s, b, h, qi, ki), float("-inf"))
    else:  # c (a S + f) = a (c S) + c f: one fused pass over the B x H x T x T logits; a, f c without the batch
        c = None if ssmax is None else ssmax[:1 if doc is None else B, :, :, None].float()
        s = ((q.float() if c is None else q.float() * c) / math.sqrt(D)) @ k.float().transpose(-1, -2)
        f, a = (x.float()[h, distance(qi + q_offset, ki)] for x in affine)
        s = torch.addcmul(torch.where(mask, f if c is None else f * c, float("-inf")), a, s)
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


def choose_engine(engine, plain, device, B, H, Tq, Tk, inference=False):
    """'auto': on CUDA flash for plain NoPE (no SSMax, no documents), sdpa for one query
    (decoding: no T x T term) and flex otherwise. Elsewhere sdpa's flash kernel for plain NoPE; for
    the others without autograd (inference) the chunked engine's inference tiles, with autograd
    sdpa while the T x T bias is small and chunked beyond."""
    if engine != "auto":
        return engine
    if device.type == "cuda":
        return "sdpa" if plain or Tq == 1 else "flex"
    if plain and Tq in (1, Tk):
        return "sdpa"
    if inference and Tq > 1:
        return "chunked"
    return "sdpa" if B * H * Tq * Tk <= 2 ** 26 else "chunked"


# ----------------------------------------------------------------------------------------
# rotary embeddings (RoPE and p-RoPE)

def rotary_frequencies(head_dim, base, fraction):
    """Inverse frequencies of the rotary pairs. p-RoPE (fraction < 1) rotates only the
    highest-frequency `fraction` of the pairs; the rest get frequency 0, i.e. no rotation."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_freq[round(fraction * inv_freq.numel()):] = 0.0
    return inv_freq


def fitted_rope_fraction(head_dim, base, block_size):
    """p-RoPE sized to the training length (docs/findings.md, "p-RoPE fitted to the training length"): the
    fraction of rotary pairs whose wavelength 2 pi / freq fits in block_size tokens, so that every
    pair that rotates turns at least once in training. At the scale-invariant paper's 4K tokens
    (base 10000, head size 64 or 128) this is 0.72, close to their 0.75 (effective base ~1000)."""
    wavelengths = 2 * math.pi / rotary_frequencies(head_dim, base, 1.0)
    return (wavelengths <= block_size).sum().item() / wavelengths.numel()


def apply_rotary(x, positions, inv_freq):
    """Rotate (B, H, T, D) by angle position * freq, pairing dimension i with i + D/2."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
