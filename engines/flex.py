"""
The flex engine: FlexAttention with a causal (+ document) block mask, fused and compiled on CUDA,
eager and forward only elsewhere (docs/engines.md: how it runs under torch.compile).
"""
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


FLEX_BLOCK = 128  # FlexAttention's sparse block size: the block mask says which key blocks each query block sees


def flex_block_mask(B, Tq, Tk, q_offset, doc, device):
    """The causal (+ same document) BlockMask of one forward, built from block-level tensors:
    O((T / 128)^2) memory, no T x T mask, and plain tensor ops, so torch.compile traces it into
    the model's graph (no graph break) and it needs no cache. Blocks wholly inside the causal
    (+ document) region are 'full' and skip the mask function; the others are 'partial'."""
    n_q, n_k = -(-Tq // FLEX_BLOCK), -(-Tk // FLEX_BLOCK)
    q_first = q_offset + torch.arange(n_q, device=device) * FLEX_BLOCK  # absolute positions
    q_last = (q_first + FLEX_BLOCK - 1).clamp(max=q_offset + Tq - 1)
    k_first = torch.arange(n_k, device=device) * FLEX_BLOCK
    k_last = k_first + FLEX_BLOCK - 1  # padded: a last, short key block is never full
    some = (k_first[None, :] <= q_last[:, None])[None]  # (1, n_q, n_k): some key is visible
    full = (k_last[None, :] <= q_first[:, None])[None]  # every key is visible to every query
    if doc is not None:  # document ids never decrease along a row: compare each block's first and last
        dq_lo, dq_hi = doc[:, q_first, None], doc[:, q_last, None]  # (B, n_q, 1)
        dk_lo, dk_hi = doc[:, None, k_first], doc[:, None, k_last.clamp(max=Tk - 1)]  # (B, 1, n_k)
        some = some & (dk_lo <= dq_hi) & (dk_hi >= dq_lo)
        full = full & (dq_lo == dq_hi) & (dk_lo == dk_hi) & (dk_lo == dq_lo)

    def listed(blocks):  # (B, n_q, n_k) bools -> per query block: how many, and their indices first
        count = blocks.sum(-1, dtype=torch.int32)[:, None]  # (B, 1, n_q)
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return count, order.to(torch.int32)[:, None]  # (B, 1, n_q, n_k)

    # q is the local query index. A q_offset of 0 (no KV cache) is left out: under dynamic shapes
    # torch.compile captures it as a symbolic scalar, which Inductor's flex lowering cannot take
    def causal(b, h, q, kv):
        return (q + q_offset if q_offset else q) >= kv

    def causal_document(b, h, q, kv):
        q = q + q_offset if q_offset else q
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    return BlockMask.from_kv_blocks(*listed(some & ~full), *listed(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=causal if doc is None else causal_document, seq_lengths=(Tq, Tk))


def flex_kernel_options(q):
    """Triton tile sizes for flex on q's GPU, by its shared memory per block, the dtype and the
    head size; None off CUDA and for decoding (torch's own choice there). torch's defaults ran out
    of shared memory on an H100 with table-indexing score_mods; fixed large tiles fail on GPUs
    with ~100 KB per block (RTX 3090/4090). Keys with fwd_/bwd_ set one pass only."""
    if q.device.type != "cuda" or q.shape[2] < FLEX_BLOCK:
        return None
    shared = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    if shared >= 200 * 1024:  # H100, H200, B200: forward tiles measured on an H100, torch's sm90 backward
        options = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8,
                   "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
                   "bwd_num_stages": 3, "bwd_num_warps": 8}
    else:
        options = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 4,
                   "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                   "bwd_num_stages": 1, "bwd_num_warps": 4}
    if q.element_size() > 2:  # float32: torch's own backward tiles for it are already the smallest
        options = {k: v for k, v in options.items() if not k.startswith("bwd_")}
    shrink = max(1, q.element_size() * q.shape[-1] // 128)  # 2 bytes x 64 dims is what the tiles above fit
    return {k: max(16, v // shrink) if "BLOCK_N" in k or "BLOCK_M1" in k else v for k, v in options.items()}


@torch.library.custom_op("longgpt::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy that torch.compile must write to memory. Flex's captured tensors (tables, the SSMax
    factor) computed inside a compiled graph are otherwise left as unwritten expressions, which
    Inductor's flex lowering for the CPU rejects ('Cannot Append Choice: Pointwise')."""
    return x.clone()


materialize.register_fake(torch.empty_like)
materialize.register_autograd(lambda ctx, grad: grad)


def flex_capture(t):
    """A tensor that flex's score_mod reads, as compiled flex must see it: materialized off CUDA
    inside a compiled graph; as it is on CUDA (its lowering takes expressions) and eagerly."""
    return materialize(t) if t.device.type != "cuda" and torch.compiler.is_compiling() else t


_flex_compiled = None


def flex_engine(q, k, v, score_mod, block_mask, return_lse=False, enable_gqa=False):
    """FlexAttention; return_lse and enable_gqa (q heads a multiple of k's) as flex_attention takes them."""
    if q.device.type != "cuda" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("FlexAttention has no backward off CUDA: train with --engine sdpa or chunked")
    flex_args = dict(score_mod=score_mod, block_mask=block_mask, return_lse=return_lse, enable_gqa=enable_gqa)
    if q.device.type != "cuda" and not torch.compiler.is_compiling():
        with warnings.catch_warnings():  # eager flex: forward only, a reference off CUDA (it warns so)
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, **flex_args)
    options = flex_kernel_options(q)
    if torch.compiler.is_compiling():  # inside a compiled model, flex is compiled with the rest
        return flex_attention(q, k, v, **flex_args, kernel_options=options)
    global _flex_compiled
    if _flex_compiled is None:  # shapes become dynamic after the first new length: few recompiles
        _flex_compiled = torch.compile(flex_attention)
    return _flex_compiled(q, k, v, **flex_args, kernel_options=options)
