"""
sdpa's fused CPU kernel for an additive prior that trains: the kernel runs attention with the bias
detached, and a tiled backward gives q, k, v their gradients and the prior and SSMax theirs from the
bias's gradient, summed along its diagonals.

A prior adds B_ij = c_i f_h(i - j) to the logits S_ij (c_i the SSMax factor, 1 without). Through a
bias that needs a gradient sdpa takes its math path on a CPU: the B x H x T x T logits, their
softmax and its backward over every entry, the masked half too, then a scatter of the bias's
gradient into the (H, T) table (docs/performance.md has the profile). Yet the prior needs only

    dLoss/df_h(t) = sum over b, i of c_i G_i,i-t        (the t-th diagonal of c G)
    dLoss/dc_i    = sum_j G_ij f_h(i - j)               (+ the S part, through c q)
    G_ij = dLoss/dB_ij = P_ij (dO_i . v_j - D_i),  D_i = dO_i . O_i   (the softmax's backward)

and autograd takes dLoss/df from the table to the prior's parameters, whatever they are. So the
forward runs the fused kernel (told that attention is causal, it skips the tiles above the
diagonal) and keeps its log-sum-exp; the backward walks query tiles against the keys they see:
P from the log-sum-exp, G, then dq = G k, dk = G^T q, dv = P^T dO (the softmax backward the kernel
would do) and G summed over the batch and along its diagonals with one strided view. Nothing
T x T per batch row is kept, and nothing is scattered.
Four details make the tiles fast: lse_i and D_i ride in one more column of q and dO (against a
column of ones in k and v), so that each matmul yields L - lse and dO . v - D directly; P is exp2
of base-2 logits, since the CPU's exp leaves its vector path on inputs below -88; a tile of more
than CACHED entries runs over slices of the batch, so that its elementwise passes stay in the cache;
and the tiles and the extended q, k, v, dO are written into buffers kept from call to call.
An affine prior (a S + f: no kernel takes the product) runs its forward over the same tiles.
"""
import math

import torch

from attention import allowed, index_grids

LOG2E = 1 / math.log(2)
CACHED = 2 ** 20  # entries of a tile (batch rows x heads x query rows x keys): 4 MB in float32
TILE = 64  # query rows per tile of the backward: its P and G are B x H x 64 x (keys the tile sees)


def fused_attention(q, k, v, bias):
    """Causal attention with an additive bias (-inf where masked) on sdpa's fused CPU kernel, which
    skips the tiles above the diagonal when told the attention is causal: (output, log-sum-exp)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, attn_mask=bias.to(q.dtype))


def diagonal_attention(q, k, v, f, a, ssmax, doc, tile=TILE):
    """Causal self-attention (Tq = Tk) with logits c_i (a[h, i - j] S_ij + f[h, i - j]): f, a (H, T) the
    prior's tables, with the gradients of its parameters (a None for an additive prior: 1), ssmax c
    (B, H, T) or None."""
    B, H, T, _ = q.shape
    f_grid = distance_grid(f.detach(), 0.0)[None]  # (1, H, T, T): f of every (query, key) pair, shared by the batch
    a_grid = None if a is None else distance_grid(a.detach(), 0.0)
    c = None if ssmax is None else ssmax.detach()[:1 if doc is None else B, :, :, None]
    base = 1.0 if a is None else LOG2E  # the bias c f: for the fused kernel in base e, for an affine prior's tiles in base 2
    if doc is None:  # causal: -inf above the diagonal
        causal = distance_grid(f.new_zeros(H, T), float("-inf"))[None]
        bias = causal.add_(f_grid, alpha=base) if c is None else torch.addcmul(causal, f_grid, c, value=base)
    else:
        b, h, qi, ki = index_grids(B, H, (0, T), (0, T), q.device, doc)
        bias = torch.where(allowed(b, qi, ki, 0, doc), (f_grid if c is None else c * f_grid) * base, float("-inf"))
    if ssmax is not None:  # c (a S + f) = a (c q).k / sqrt(d) + f c: c folded into q, its S part through here
        q = q * ssmax[..., None].to(q.dtype)
    if a is None and not f.requires_grad and (ssmax is None or not ssmax.requires_grad):
        # a bias that nothing trains (ALiBi): the kernel's own backward, for q, k and v only
        return fused_attention(q, k, v, bias)[0]
    return PriorAttention.apply(q, k, v, bias, f_grid[0], a_grid, f, a, ssmax, tile)


class PriorAttention(torch.autograd.Function):
    """Attention with the bias on the fused kernel (an affine prior: over query tiles); the backward of
    the module docstring gives q, k, v, the prior's tables f and a (H, T) and the SSMax factor c
    (B, H, T) their gradients."""

    @staticmethod
    def forward(ctx, q, k, v, bias, f_grid, a_grid, f, a, c, tile):
        out, lse = fused_attention(q, k, v, bias) if a_grid is None else affine_attention(q, k, v, a_grid, bias, tile)
        ctx.save_for_backward(q, k, v, out, lse, bias, f_grid, a_grid, c)
        ctx.tile = tile
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, bias, f_grid, a_grid, c = ctx.saved_tensors
        wanted = ctx.needs_input_grad[6:9]  # f, a, c
        grads = attention_backward(d_out, q, k, v, out, lse, bias, f_grid, a_grid, c, wanted, ctx.tile)
        return *grads[:3], None, None, None, *grads[3:], None


@torch.no_grad()
def affine_attention(q, k, v, a_grid, bias, tile):
    """(output, log-sum-exp) of attention with logits a S + bias, a (H, T, T), bias in base 2, one
    softmax per query tile over every key it sees (no kernel takes a S), in base 2 for exp2."""
    B, H, T, D = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q2, k, v = q.to(dtype) * (LOG2E / math.sqrt(D)), k.to(dtype), v.to(dtype)
    a_grid, bias = a_grid.to(dtype), bias.to(dtype)
    out, lse = torch.empty_like(q2), q2.new_empty(B, H, T)
    for i0 in range(0, T, tile):
        i1 = min(i0 + tile, T)
        rows, keys = slice(i0, i1), slice(0, i1)
        for b in batch_slices(B, H * (i1 - i0) * i1):
            cb = slice(None) if bias.shape[0] == 1 else b  # the bias's rows: one for the batch without documents
            shape = (b.stop - b.start, H, i1 - i0, i1)
            s = torch.matmul(q2[b, :, rows], k[b, :, keys].transpose(-1, -2), out=kept("S", shape, q2))
            x = torch.addcmul(bias[cb, :, rows, keys], s, a_grid[:, rows, keys], out=s)
            top = x.amax(-1, keepdim=True)  # every query sees its own key: finite
            p = x.sub_(top).exp2_()
            total = p.sum(-1, keepdim=True)
            out[b, :, rows] = (p @ v[b, :, keys]).div_(total)
            lse[b, :, rows] = (top + total.log2()).squeeze(-1) / LOG2E
    return out.to(q.dtype), lse


@torch.no_grad()
def attention_backward(d_out, q, k, v, out, lse, bias, f_grid, a_grid, c, wanted, tile):
    """(dq, dk, dv, then dLoss/df (H, T), dLoss/da (H, T) and dLoss/dc's bias part (B, H, T), each None
    unless `wanted`), over query tiles of `tile` rows: q is c q (SSMax folded in), bias c f (-inf where
    masked; in base 2 for an affine prior), f_grid and a_grid f and a (H, T, T) (a_grid None: a = 1)."""
    B, H, T, D = q.shape
    dtype, scale = torch.promote_types(q.dtype, torch.float32), 1 / math.sqrt(D)
    q, k, v, d_out = q.to(dtype), k.to(dtype), v.to(dtype), d_out.to(dtype)
    ones, extended = q.new_ones(B, H, T, 1), (B, H, T, D + 1)
    d_row = torch.mul(d_out, out.to(dtype), out=kept("scratch", q.shape, q)).sum(-1, keepdim=True)  # D_i
    # one more column: (q, -lse) . (k, 1) = S - lse and (dO, -D) . (v, 1) = dO . v - D, in base 2 for exp2
    lse2 = LOG2E * lse.to(dtype)[..., None]
    v_ext = torch.cat([v, ones], dim=-1, out=kept("v_ext", extended, q))
    d_ext = torch.cat([d_out, -d_row], dim=-1, out=kept("d_ext", extended, q))
    if a_grid is None:
        q_scaled = torch.mul(q, LOG2E * scale, out=kept("scratch", q.shape, q))
        q_ext = torch.cat([q_scaled, -lse2], dim=-1, out=kept("q_ext", extended, q))
        k_ext = torch.cat([k, ones], dim=-1, out=kept("k_ext", extended, q))
    else:  # a S: S alone, in base 2
        q2_scaled, a_grid = torch.mul(q, LOG2E * scale, out=kept("q_scaled", q.shape, q)), a_grid.to(dtype)
    bias, one_c = bias.to(dtype), bias.shape[0] == 1  # no documents: one bias, and one row of c, for the whole batch
    c_dtype, c = (None, None) if c is None else (c.dtype, c.to(dtype))
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad_f, grad_a = (torch.zeros(H, T, dtype=dtype, device=q.device) if w else None for w in wanted[:2])
    grad_c = torch.empty(B, H, T, dtype=dtype, device=q.device) if wanted[2] else None
    for i0 in range(0, T, tile):
        i1 = min(i0 + tile, T)
        rows, keys = slice(i0, i1), slice(0, i1)  # a query tile sees keys 0 .. i1 - 1
        summed_f = summed_a = 0  # the tile's c G and G S summed over the batch, (H, R, K)
        for b in batch_slices(B, H * (i1 - i0) * i1):
            cb, shape = slice(None) if one_c else b, (b.stop - b.start, H, i1 - i0, i1)
            p, g, scratch = kept("P", shape, q), kept("G", shape, q), kept("scratch", shape, q)
            if a_grid is None:  # the bias in base e, for the fused kernel
                torch.matmul(q_ext[b, :, rows], k_ext[b, :, keys].transpose(-1, -2), out=p).add_(
                    bias[cb, :, rows, keys], alpha=LOG2E).exp2_()
            else:  # L = a S + bias: S itself is kept for a's gradient
                s = torch.matmul(q2_scaled[b, :, rows], k[b, :, keys].transpose(-1, -2), out=kept("S", shape, q))
                torch.addcmul(bias[cb, :, rows, keys], s, a_grid[:, rows, keys], out=p).sub_(lse2[b, :, rows]).exp2_()
            torch.matmul(d_ext[b, :, rows], v_ext[b, :, keys].transpose(-1, -2), out=g).mul_(p)  # G of the tile, (b, H, R, K)
            # dLoss/dS = G a (in place when nothing else needs G; in scratch until dq and dk are taken, then G f goes there)
            g_s = (g if a_grid is None else torch.mul(g, a_grid[:, rows, keys], out=scratch) if any(wanted) else
                   g.mul_(a_grid[:, rows, keys]))
            dv[b, :, keys] += p.transpose(-1, -2) @ d_out[b, :, rows]
            dq[b, :, rows] = g_s @ k[b, :, keys]
            dk[b, :, keys] += g_s.transpose(-1, -2) @ q[b, :, rows]
            if grad_c is not None:
                grad_c[b, :, rows] = torch.mul(g, f_grid[:, rows, keys].to(dtype), out=scratch).sum(-1)
            if grad_f is not None:  # without documents c_i is the same in every batch row
                summed_f = summed_f + (g.sum(0) if c is None else g.sum(0) * c[0, :, rows, None] if one_c else
                                       torch.einsum("bhrk,bhr->hrk", g, c[b, :, rows]))
            if grad_a is not None:  # dLoss/da_ij = G_ij (c q_i).k_j / sqrt(d), S here in base 2
                summed_a = summed_a + s.mul_(g).sum(0) / LOG2E
        if grad_f is not None:
            grad_f[:, :i1] += diagonal_sums(summed_f, i0)
        if grad_a is not None:
            grad_a[:, :i1] += diagonal_sums(summed_a, i0)
    dq, dk = dq.mul_(scale), dk.mul_(scale)  # dS/dq = k / sqrt(d), dS/dk = q / sqrt(d)
    return (dq.to(out.dtype), dk.to(out.dtype), dv.to(out.dtype),
            *(None if x is None else x.to(f_grid.dtype) for x in (grad_f, grad_a)),
            None if grad_c is None else grad_c.to(c_dtype))


KEPT = {}  # (slot, device, dtype): a flat buffer, as large as the slot's largest use so far


def kept(slot, shape, like):
    """An uninitialized tensor of `shape` in memory kept from call to call for `slot`: the tiles' P, G,
    ... and the backward's extended q, k, v, dO are written into the same memory again and again, not
    into freshly allocated pages (on a CPU the first touch of a new page costs more than a pass over
    it; docs/performance.md). Compiled, Inductor plans the memory itself."""
    n = math.prod(shape)
    if torch.compiler.is_compiling():
        return like.new_empty(shape)
    key = (slot, like.device, like.dtype)
    if key not in KEPT or KEPT[key].numel() < n:
        KEPT[key] = like.new_empty(n)
    return KEPT[key][:n].view(shape)


def batch_slices(B, per_row):
    """Slices of the batch whose tiles (`per_row` entries per batch row) hold about CACHED entries: the
    tile's elementwise passes then run in the CPU's cache, not from memory."""
    n = max(1, CACHED // per_row)
    return [slice(b, min(b + n, B)) for b in range(0, B, n)]


def distance_grid(table, fill):
    """(H, T, T) grid g[h, i, j] = table[h, i - j] for j <= i, `fill` above the diagonal, from a (H, T)
    table: the reversed table with T - 1 fills behind it, viewed with strides (1, 1) as a Hankel matrix
    (row r starts one entry after row r - 1), gives the grid with its rows flipped. No index grid, no gather."""
    H, T = table.shape
    row = torch.cat([table.flip(-1), table.new_full((H, T - 1), fill)], dim=-1)  # (H, 2T - 1), contiguous
    return row.as_strided((H, T, T), (2 * T - 1, 1, 1)).flip(-2)


def diagonal_sums(x, i0):
    """s (H, i0 + R) with s[h, t] = sum of x[h, r, j] over i0 + r - j = t, for x (H, R, K = i0 + R) the
    tile of query rows i0 .. i0 + R - 1 against keys 0 .. K - 1 (entries with j > i0 + r ignored).
    With R zero columns in front, padded[r, R + j] = x[r, j] and the diagonal t runs through flat
    offsets r (R + K + 1) + (R + i0 - t): one strided view, summed over r."""
    H, R, K = x.shape
    padded = x.new_zeros(H, R, R + K)
    padded[:, :, R:] = x
    diagonals = padded.as_strided((H, R + i0 + 1, R), (R * (R + K), 1, R + K + 1))  # [h, e, r] = padded[h, r, e + r]
    return diagonals.sum(-1).flip(-1)[:, :K]  # e = R + i0 - t
