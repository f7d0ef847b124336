"""
Memory before compute: eval_extrapolate.py refuses a length that cannot fit before it spends time on
anything, from an estimate per engine of what one forward over one sequence needs.
"""
import os

import torch

from attention import choose_engine, plain_attention
from engines.flex import FLEX_BLOCK


def resolve_engine(engine, model, length, device):
    """The engine attention.choose_engine will pick for one sequence of `length` tokens, and whether
    attention is plain there (flash: nothing T x T)."""
    plain = plain_attention(model.positional[0], model.config.ssmax, False)
    return choose_engine(engine, plain, device, 1, model.config.n_head, length, length, inference=True), plain


def estimate_memory(model, length, engine, device, vocab_chunk=0):
    """Bytes a forward over one sequence needs: weights + O(T) activations + the engine's
    attention term (sdpa: H x T x T bias, mask and weights; chunked: one H x block x T bias buffer
    and its document mask, ~16 score tiles alive for a score that is not additive; flex: O(T) and
    the block mask's O((T/128)^2) on CUDA, T x T in eager mode elsewhere) + chunked logits for the loss."""
    c = model.config
    weights = 4 * model.num_params()
    # residual stream, norms, qkv and its float32 copies, MLP (4C, twice) and the variant's tables
    activations = 4 * length * (24 * c.n_embd + 4 * c.n_head)
    engine, plain = resolve_engine(engine, model, length, device)
    if engine == "chunked":
        block = min(c.attn_block, length)
        attention = 5 * c.n_head * block * length + 16 * 4 * c.n_head * block ** 2
    elif engine == "sdpa" and plain:
        attention = 0
    elif engine == "flex" and device.type == "cuda":  # the block mask: int32 block lists, both ways
        attention = 4 * 4 * (length // FLEX_BLOCK + 1) ** 2
    else:
        attention = 3 * 4 * c.n_head * length ** 2
    logits = 3 * 4 * min(vocab_chunk, length) * c.vocab_size
    return weights + activations + attention + logits, engine


def available_memory(device):
    """Free bytes on the device: CUDA's free memory, else MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None


def check_memory(model, lengths, args, device):
    if args.max_memory_gb:
        available = args.max_memory_gb * 2 ** 30
    else:  # the model is loaded already: its weights are in the estimate, not in the free memory
        available = available_memory(device)
        available = available and available + 4 * model.num_params()
    for label, length in lengths:
        vocab_chunk = args.loss_chunk if args.task == "loss" else 0
        need, engine = estimate_memory(model, length, args.engine, device, vocab_chunk)
        if available is not None and need > available:
            raise ValueError(f"length {label} ({length} tokens) needs about {need / 2**30:.1f} GB with the {engine} "
                             f"engine, {available / 2**30:.1f} GB available; use --engine chunked, a smaller "
                             f"--attn-block, or --max-memory-gb")
