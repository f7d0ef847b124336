"""
The chunked engine: attention over tiles, on any device, for lengths whose T x T logits do not fit.

    chunked_attention   online softmax over (query tile x key tile) pairs through the variant's
                        score function: differentiable, and the log-sum-exp when asked for
    toeplitz_attention  inference: per query tile, one fused F.scaled_dot_product_attention call
                        over every key the tile sees, its bias a zero-copy view of the distance tables

A variant's score depends on the head and the distance t = i - j only (README, "Adding a prior").
With the keys taken in reverse order, entry (a, k') of a query tile's bias is table[a + k' + const]:
each row is the one before shifted by one, a Hankel matrix, which as_strided gives with strides
(1, 1) over one padded row per head. Nothing T x T is built, and the bias is never indexed by a grid.
"""
import math

import torch
import torch.nn.functional as F

from attention import allowed, index_grids


def softmax_step(m, l, acc, logits, values):
    """One key block of an online softmax: the running max m and sum l of exp(logits - m), and
    acc = sum of exp(logits - m) values, updated with this block. Without autograd the logits are
    overwritten."""
    m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
    m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
    p = (logits - m_safe if torch.is_grad_enabled() else logits.sub_(m_safe)).exp_()
    correction = torch.exp(m - m_safe)
    return m_new, l * correction + p.sum(dim=-1, keepdim=True), acc * correction + p @ values


def chunked_attention(q, k, v, score_mod, doc, q_offset, block, return_lse=False):
    """Online softmax over (query block x key block) tiles, in float32 (float64 for float64
    inputs). Memory ~ B*H*block^2.
    return_lse: also the log-sum-exp of each query's logits (B, H, Tq), as flex returns it."""
    B, H, Tq, D = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    out, lse = [], []
    for qs in range(0, Tq, block):
        qe = min(qs + block, Tq)
        q_tile = q[:, :, qs:qe].to(dtype) / math.sqrt(D)
        m = torch.full((B, H, qe - qs, 1), float("-inf"), device=q.device, dtype=dtype)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, H, qe - qs, D, device=q.device, dtype=dtype)
        k_end = q_offset + qe  # causal: later keys are never seen by this query block
        for ks in range(0, k_end, block):
            ke = min(ks + block, k_end)
            b, h, qi, ki = index_grids(B, H, (qs, qe), (ks, ke), q.device, doc)
            s = score_mod(q_tile @ k[:, :, ks:ke].to(dtype).transpose(-1, -2), b, h, qi, ki)
            if doc is not None or ke - 1 > qs + q_offset:  # tiles wholly in the past need no mask
                s = torch.where(allowed(b, qi, ki, q_offset, doc), s, float("-inf"))
            m, l, acc = softmax_step(m, l, acc, s, v[:, :, ks:ke].to(dtype))
        out.append(acc / l)
        lse.append((m + torch.log(l)).squeeze(-1))
    out = torch.cat(out, dim=2).to(q.dtype)
    return (out, torch.cat(lse, dim=2)) if return_lse else out


def hankel(table, rows, cols):
    """(H, rows, cols) view v[h, a, k'] = table[h, a + k'] of a contiguous (H, n) table."""
    return table.as_strided((table.shape[0], rows, cols), (table.stride(0), 1, 1), table.storage_offset())


def toeplitz_attention(q, k, v, prior, scale, ssmax, doc, q_offset, block):
    """Causal attention whose logits are c_i (a_h(t) S_ij + f_h(t)), t = i - j (SSMax c_i = 1
    without it, a = 1 for additive variants), without autograd. q (B, H, Tq, D), k and v
    (B, H, Tk, D); prior f and scale a: (H, Tk) tables over t, or None (f = 0, a = 1); ssmax
    (B, H, Tq) or None; doc (B, Tk) or None. Memory ~ B x H x block x Tk (nothing with an additive
    variant, no SSMax and no documents: the bias is then a view)."""
    B, H, Tq, D = q.shape
    Tk, pad = k.shape[2], min(block, Tq) - 1
    k, v = k.flip(2), v.flip(2)  # key j is now at Tk - 1 - j
    # padded tables: entry pad + t holds distance t; t < 0 (a future key) is masked
    prior = torch.zeros(H, Tk, device=q.device, dtype=q.dtype) if prior is None else prior.to(q.dtype)
    ext = torch.cat([prior.new_zeros(H, pad), prior], dim=1)
    causal = torch.cat([prior.new_full((H, pad), float("-inf")), prior.new_zeros(H, Tk)], dim=1)
    if scale is not None:
        ext_scale = torch.cat([prior.new_ones(H, pad), scale.to(q.dtype)], dim=1)
    plain_bias = ext + causal  # the one bias of an additive variant without SSMax and documents
    # document ids never decrease along a row, so a document starts at the first index holding its id
    doc_start = None if doc is None else torch.searchsorted(doc, doc)
    doc_flipped = None if doc is None else doc.flip(1)
    bias_buffer = q.new_empty(1 if doc is None else B, H, min(block, Tq), Tk)
    out = []
    for qs in range(0, Tq, block):
        qe = min(qs + block, Tq)
        n_keys = q_offset + qe  # the tile sees keys 0 .. n_keys - 1; causal within it
        lo = 0 if doc is None else int(doc_start[:, q_offset + qs].min())  # keys before every row's document
        keys, values = k[:, :, Tk - n_keys:Tk - lo], v[:, :, Tk - n_keys:Tk - lo]
        # entry (a, k') of this tile: query q_offset + qs + a, key n_keys - 1 - k', t = a + k' - (qe - qs - 1)
        shift = pad - (qe - qs - 1)
        view = lambda table: hankel(table[:, shift:], qe - qs, n_keys - lo)[None]  # (1, H, rows, keys)
        q_tile = q[:, :, qs:qe]
        c = None if ssmax is None else ssmax[:1 if doc is None else B, :, qs:qe, None].to(q.dtype)
        if scale is None and c is None and doc is None:
            out.append(F.scaled_dot_product_attention(q_tile, keys, values, attn_mask=view(plain_bias)))
            continue
        if doc is not None:  # where key and query lie in the same document
            same = (doc[:, q_offset + qs:q_offset + qe, None] == doc_flipped[:, None, Tk - n_keys:Tk - lo])[:, None]

        def fill(bias, cols):  # the tile's bias f c (-inf where masked) on key columns `cols`, into `bias`
            if c is None:
                bias.copy_(view(ext)[..., cols]).add_(view(causal)[..., cols])
            else:
                torch.addcmul(view(causal)[..., cols], view(ext)[..., cols], c, out=bias)
            return bias if doc is None else bias.masked_fill_(~same[..., cols], float("-inf"))

        if scale is None:  # (S + f) c = (q c).k / sqrt(D) + f c: c folded into q, f c the bias
            # written into one buffer: rows stay contiguous (the kernel would copy a bias whose
            # layout follows the views'), and no tile allocates
            bias = fill(bias_buffer[:, :, :qe - qs, :n_keys - lo], slice(None))
            out.append(F.scaled_dot_product_attention(q_tile if c is None else q_tile * c, keys, values, attn_mask=bias))
            continue
        # a c S + f c: no kernel takes the product, so an online softmax over key blocks
        q_tile = (q_tile if c is None else q_tile * c) / math.sqrt(D)
        m = q.new_full((B, H, qe - qs, 1), float("-inf"))
        l, acc = torch.zeros_like(m), q.new_zeros(B, H, qe - qs, D)
        for ks in range(0, n_keys - lo, block):
            cols = slice(ks, min(ks + block, n_keys - lo))
            logits = q_tile @ keys[:, :, cols].transpose(-1, -2)
            # bias + a S in one pass over the tile (without SSMax and documents the bias is a view)
            bias = view(plain_bias)[..., cols] if c is None and doc is None else fill(
                bias_buffer[:, :, :qe - qs, :cols.stop - ks], cols)
            torch.addcmul(bias, logits, view(ext_scale)[..., cols], out=logits)
            m, l, acc = softmax_step(m, l, acc, logits, values[:, :, cols])
        out.append(acc / l)
    return torch.cat(out, dim=2)
