"""
The engines beyond sdpa, behind one call: model.attend runs sdpa itself (attention.py) and hands
every other attention call to `attend` here.

    flex        FlexAttention with a causal (+ document) block mask (flex.py); fused and compiled on CUDA
    chunked     tiles on any device, memory linear in T (chunked.py): with autograd an online softmax
                over query x key tiles; without, one fused sdpa call per query tile on a view of the tables
    the exact route (prior_grad.py): flex or chunked with detached tables, the prior's and SSMax's
                gradients from one more attention pass (--prior-grad passes)
    diagonal.py sdpa's fused CPU kernel for a trained additive prior, its gradient summed along the
                bias's diagonals: model.attend calls it directly (the default CPU training step)
memory.py estimates what each engine needs at a length, for the evaluation's memory check.
"""
import torch

from attention import affine_tables, make_score_mod
from engines.chunked import chunked_attention, toeplitz_attention
from engines.flex import flex_block_mask, flex_capture, flex_engine
from engines.prior_grad import attend_exact, derivative_tables, prior_repeats, route_problem


def attend(q, k, v, args, ssmax, q_offset, engine):
    """model.attend's call on the engine `engine` (flex or chunked; sdpa with derivative tables
    never happens: GPT.attention_args makes them for flex and chunked only)."""
    variant, tables, doc = args.variant, args.tables, args.doc
    if args.derivatives is not None:  # the prior's and SSMax's gradients from one more attention pass
        return attend_exact(q, k, v, variant, tables, args.derivatives, ssmax, doc, engine, args.block, args.block_mask,
                            q_offset)
    if engine == "flex":
        tables = {key: flex_capture(t) for key, t in tables.items()}
        ssmax = None if ssmax is None else flex_capture(ssmax)
        block_mask = args.block_mask
        if block_mask is None:
            block_mask = flex_block_mask(q.shape[0], q.shape[2], k.shape[2], q_offset, doc, q.device)
        return flex_engine(q, k, v, make_score_mod(variant, tables, ssmax, q_offset), block_mask)
    if engine == "chunked":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, ssmax, *tables.values()))
        affine = None if needs_grad else affine_tables(variant, tables, q.shape[1], k.shape[2], q.device)
        if affine is not None:  # inference: the fused kernel on views of the tables
            return toeplitz_attention(q, k, v, *affine, ssmax, doc, q_offset, args.block)
        return chunked_attention(q, k, v, make_score_mod(variant, tables, ssmax, q_offset), doc, q_offset, args.block)
    raise ValueError(f"unknown attention engine {engine!r}; choose one of sdpa, flex, chunked")

