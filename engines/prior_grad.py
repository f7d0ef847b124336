"""
Exact gradients for a learned positional prior and the SSMax scale, without flex's atomics.

FlexAttention sums the gradient of a tensor that its score_mod reads (a prior's table, the SSMax
factor) with an atomic add per score element: inside a compiled GPT-2 124M step on an H100 that
made BAM+SSMax 3.7x slower than the same kernel with the table detached (docs/engines.md). Yet a prior
has a few parameters per head. Here attention runs with detached tables and the SSMax factor
folded into q, and the parameters get their exact gradient from one more attention pass, run
forward only, for all of them at once.

The math, per head. Logits L_ij = c_i (S_ij + f(t)), t = i - j, c_i the SSMax factor (1 without),
P = softmax_j(L), O_i = sum_j P_ij v_j, lse_i = log sum_j exp(L_ij). For a parameter theta with
g(t) = df(t)/dtheta, and D_i = dO_i . O_i,

    dLoss/dtheta = sum_i c_i E_i(g),    dLoss/dc_i = (the S part, through c_i q_i) + E_i(f),
    E_i(g) = sum_j P_ij g(t_ij) (dO_i . v_j - D_i).

For t >= 1 write g = sigma (r + m): sigma = +-1, r >= 0 and m <= 0 a constant, which is 0 when g
keeps one sign there (BAM's parameters, a Cauchy prior's per-head width; a trained centre would not).
sum_{j != i} P_ij r_ij v_j is then an attention output: attention with logits L + log r (and -inf
at t = 0) gives O'_i and lse'_i, with rho_i = exp(lse'_i - lse_i) = sum_{j != i} P_ij r_ij. As
sum_j P_ij (dO_i . v_j - D_i) = 0, the t = 0 term and the constant m fold into the diagonal:

    E_i(g) = dO_i . W_i,    W_i = sigma rho_i (O'_i - O_i) + (g(0) - sigma m) P_ii (v_i - O_i).

W does not depend on dO, so it is made in the forward and kept for the backward, where
AttachGradients turns it into dLoss/dtheta = sum_i dO_i . c_i W_i and dLoss/dc_i = dO_i . W_i(f). The
passes for all parameters (and c) run as one attention call with the heads stacked, keys and values
shared GQA-style. A parameter whose g is f itself (BAM's theta_alpha: f = -exp(theta_alpha) (...))
shares f's pass with SSMax: prior_repeats finds them once, when the model is built.
"""
import copy
import math

import torch

from attention import contract_problem, distance, make_score_mod
from engines.chunked import chunked_attention
from engines.flex import flex_block_mask, flex_capture, flex_engine


def prior_table(variant, tables, n_head, n):
    """f[h, t], what an additive variant adds to the score at distance t: its score at s = 0.
    None for a variant without tables (NoPE adds nothing)."""
    if not tables:
        return None
    device = next(iter(tables.values())).device
    h, t = torch.arange(n_head, device=device)[:, None], torch.arange(n, device=device)[None, :]
    return variant.score(0.0, 0, h, t, 0, tables).expand(n_head, n)


def prior_with(variant, name, value, n_head, n, device):
    """f of `variant` with its parameter `name` replaced by `value`."""
    return prior_table(variant, torch.func.functional_call(variant, {name: value}, (n, device)), n_head, n)


def derivative_tables(variant, n_head, n, device, repeats=()):
    """[(theta, g)] for each trained parameter theta of the variant, g[h, t] = df_h(t) / dtheta_h,
    by forward-mode AD: the tangent 1 on every head gives each head's own derivative, since a head's
    prior depends on its own entry only (route_problem checks it). g is None for the parameters in
    `repeats` (prior_repeats): their g is f."""
    return [(p, None if name in repeats else torch.func.jvp(
                lambda x: prior_with(variant, name, x, n_head, n, device), (p,), (torch.ones_like(p),))[1].detach())
            for name, p in variant.named_parameters() if p.requires_grad]


def prior_repeats(variant, n_head):
    """Names of the trained parameters whose derivative table equals the prior table f at every value,
    probed in float64 at the parameters' values and at two random draws around them."""
    probe, n = copy.deepcopy(variant).double().cpu(), 8
    draws = torch.Generator().manual_seed(0)
    repeats = []
    for name, p in probe.named_parameters():
        values = [p.detach()] + [p.detach() + 0.3 * torch.randn(p.shape, generator=draws, dtype=p.dtype) for _ in range(2)]
        tables = [torch.func.jvp(lambda x: prior_with(probe, name, x, n_head, n, "cpu"), (x,), (torch.ones_like(x),))
                  for x in values]
        if p.requires_grad and all(torch.allclose(g, f, rtol=1e-12, atol=0) for f, g in tables):
            repeats.append(name)
    return tuple(repeats)


def route_problem(variant, n_head):
    """Why the variant's parameters cannot get their gradient here, or None if they can: the score
    must be S + f(h, t), and each parameter one value per head that moves only that head's prior."""
    if not variant.additive:
        return "its score is not additive (S + f(h, t))"
    problem = contract_problem(variant, n_head)
    if problem:
        return problem
    n = 8
    for name, p in variant.named_parameters():
        if p.shape != (n_head,):
            return f"its parameter {name} has shape {tuple(p.shape)}, not one value per head"
        jacobian = torch.func.jacfwd(lambda x: prior_with(variant, name, x, n_head, n, "cpu"))(p.detach())
        if jacobian.mul(1 - torch.eye(n_head)[:, None, :]).abs().sum() > 0:  # (H, n, H): head h moved by h' != h
            return f"its parameter {name} moves the prior of other heads too"
    return None


def attend_with_lse(q, k, v, score_mod, engine, doc, block, block_mask, q_offset=0):
    """(output, lse) of causal attention of q, the queries from position q_offset on, over every key,
    by flex or chunked. q may have a multiple of k's heads: each group of consecutive query heads
    shares one key head."""
    if engine == "flex":
        return flex_engine(q, k, v, score_mod, block_mask, return_lse=True, enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return chunked_attention(q, k, v, score_mod, doc, q_offset, block, return_lse=True)


def detached(t, engine):
    """t without gradient, as compiled flex captures it (attention.flex_capture)."""
    return flex_capture(t.detach()) if engine == "flex" else t.detach()


@torch.no_grad()
def gradient_weights(q, k, v, out, lse, score_mod, derivatives, engine, doc, block, block_mask, q_offset=0):
    """W of the module docstring for each (H, n) table in `derivatives`: (B, H, G, Tq, D) in float32
    (float64 for float64 inputs), with q the queries from position q_offset on as attention saw them
    (SSMax folded in) and score_mod the one that made out and lse (it takes local query indices)."""
    B, H, T, D = q.shape
    dtype = torch.promote_types(out.dtype, torch.float32)
    g = torch.stack(derivatives, dim=1)  # (H, G, n)
    G = g.shape[1]
    rest = g[..., 1:]
    sign = torch.where(rest.sum(-1, keepdim=True) < 0, -1.0, 1.0)  # (H, G, 1)
    m = torch.cat([sign * rest, torch.zeros_like(sign)], dim=-1).amin(-1, keepdim=True)  # <= 0
    log_r = detached(torch.cat([torch.full_like(sign, -math.inf), torch.log(sign * rest - m)], dim=-1), engine)
    log_r = log_r.flatten(0, 1)  # (H * G, n)

    def stacked_score(s, b, h, q_idx, kv):  # query head h is quantity h % G of head h // G
        return score_mod(s, b, h // G, q_idx, kv) + log_r[h, distance(q_idx + q_offset, kv)]

    spread_out, spread_lse = attend_with_lse(q.repeat_interleave(G, dim=1), k, v, stacked_score,
                                             engine, doc, block, block_mask, q_offset)
    rho = torch.exp(spread_lse.view(B, H, G, T, 1) - lse.view(B, H, 1, T, 1))  # rows with no weight: 0
    o = out.to(dtype)[:, :, None]
    spread = torch.where(rho > 0, rho * (spread_out.to(dtype).view(B, H, G, T, D) - o), 0.0)
    # the diagonal: P_ii = exp(L_ii - lse_i), L_ii from the same score function at q = kv = i
    i = torch.arange(T, device=q.device)  # local query index; its key is at q_offset + i
    k_diag, v_diag = k[:, :, q_offset:].to(dtype), v[:, :, q_offset:].to(dtype)  # (B, H, T, D)
    s_diag = (q.to(dtype) * k_diag).sum(-1) / math.sqrt(D)
    logit_diag = score_mod(s_diag, torch.arange(B, device=q.device)[:, None, None],
                           torch.arange(H, device=q.device)[None, :, None], i, i + q_offset)
    p_diag = torch.exp(logit_diag - lse)[:, :, None, :, None]  # (B, H, 1, T, 1)
    to_diag = (g[..., :1] - sign * m)[None, :, :, :, None]  # (1, H, G, 1, 1)
    return sign[None, ..., None] * spread + to_diag * p_diag * (v_diag - out.to(dtype))[:, :, None]


class AttachGradients(torch.autograd.Function):
    """out, unchanged, whose backward gives the SSMax factor c and each parameter theta the gradients of
    the module docstring from the weights W (B, H, G, T, D): dO . W[slot of f] for c, and
    sum over batch, positions and dims of dO . c W[slot of theta] for theta. The products and sums
    are formed in W's dtype (float32 under fp16 autocast), never in out's: fp16's 65504 is passed by
    c W at long lengths, and inf x 0 would be NaN."""

    @staticmethod
    def forward(ctx, out, weights, ssmax, c_slot, theta_slots, *thetas):
        ctx.save_for_backward(weights, ssmax)
        ctx.c_slot, ctx.theta_slots = c_slot, theta_slots
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        weights, ssmax = ctx.saved_tensors
        d_out = grad_out.to(weights.dtype)
        grad_c = None if ctx.c_slot is None else (d_out * weights[:, :, ctx.c_slot]).sum(-1).to(ssmax.dtype)
        row = d_out if ssmax is None else d_out * ssmax[..., None].to(weights.dtype)
        grad_thetas = [(row * weights[:, :, slot]).sum((0, 2, 3)) for slot in ctx.theta_slots]
        return grad_out, None, grad_c, None, None, *grad_thetas


def attend_exact(q, k, v, variant, tables, derivatives, ssmax, doc, engine, block, block_mask, q_offset=0):
    """Causal attention as model.attend gives it (flex or chunked, no KV cache: q_offset > 0 when
    only the last queries are computed), with the gradients of the prior's parameters and of the
    SSMax factor from the route above. derivatives: derivative_tables(variant, ...)."""
    if not variant.additive:
        raise ValueError(f"the exact prior-gradient route cannot take {type(variant).__name__}: "
                         f"{route_problem(variant, q.shape[1])}; use attention.attend")
    B, H, T, _ = q.shape
    Tk = k.shape[2]
    if engine == "flex" and block_mask is None:
        block_mask = flex_block_mask(B, T, Tk, q_offset, doc, q.device)
    tables = {key: detached(t, engine) for key, t in tables.items()}
    c = None if ssmax is None else detached(ssmax, engine)
    with_c = make_score_mod(variant, tables, c, q_offset)

    def score_mod(s, b, h, q_idx, kv):  # (S + f) c = (c q).k / sqrt(d) + f c: c is folded into q
        return s + with_c(0.0, b, h, q_idx, kv)

    if ssmax is not None:
        q = q * ssmax[..., None].to(q.dtype)  # the S part of the SSMax gradient flows through here
    out, lse = attend_with_lse(q, k, v, score_mod, engine, doc, block, block_mask, q_offset)
    f = prior_table(variant, tables, H, Tk)
    c_trained = ssmax is not None and ssmax.requires_grad and f is not None
    if not derivatives and not c_trained:
        return out
    # the stacked quantities: f first when SSMax or a repeating parameter needs it, then each other g
    with_f = c_trained or any(g is None for _, g in derivatives)
    others = [g for _, g in derivatives if g is not None]
    theta_slots = tuple(0 if g is None else int(with_f) + sum(o is not None for _, o in derivatives[:n])
                        for n, (_, g) in enumerate(derivatives))
    weights = gradient_weights(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), score_mod,
                               [f] * with_f + others, engine, doc, block, block_mask, q_offset)
    # kept for the backward in out's dtype (bf16: float32's range), or in float32 where out is fp16
    weights = weights.to(torch.float32 if out.dtype == torch.float16 else out.dtype)
    return AttachGradients.apply(out, weights, ssmax, 0 if c_trained else None, theta_slots,
                                 *(theta for theta, _ in derivatives))
