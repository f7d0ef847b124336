"""
A compact GPT whose positional signal is one config field (attention.py has the variants), and
`attend`, which runs a layer's attention on the engine its AttentionArgs name: sdpa here, the
others through engines.attend. Pre-norm RMSNorm blocks, no biases, tied embeddings, optional
QK-norm, GELU MLP. Runs past its training length: nothing here depends on a maximum sequence
length. load_checkpoint, at the end, rebuilds a trained model from its checkpoint.
"""
import math
import os
import pickle
import struct
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import engines
from attention import (ENGINES, VARIANTS, AttentionArgs, affine_tables, apply_rotary, choose_engine,
                       contract_problem, fitted_rope_fraction, make_score_mod, plain_attention, positions_in_document,
                       rotary_frequencies, sdpa_attention, ssmax_factor)
from common.settings import check_fields, param
from engines.diagonal import diagonal_attention

ROPE_MODES = ("none", "full", "partial")
PRIOR_GRADS = ("auto", "passes", "table")


@dataclass
class GPTConfig:
    block_size: int = param(384, "training length in tokens (the model itself runs at any length)", "[1, inf)")
    vocab_size: int = param(320, "vocabulary size, padded to a multiple of 64 (train.py sets it from the data)", "[1, inf)")
    n_layer: int = param(4, "number of transformer blocks", "[1, inf)")
    n_head: int = param(4, "attention heads per block", "[1, inf)")
    n_embd: int = param(128, "model width", "[1, inf)")
    dropout: float = param(0.0, "dropout probability", "[0, 1)")
    qk_norm: bool = param(False, "RMSNorm on queries and keys before attention")
    attention: str = param("bam", "positional variant: nope | alibi | bam | scaleinv", choices=VARIANTS)
    ssmax: bool | None = param(None, "SSMax (LogN) scaling of the logits; default on for bam, off otherwise")
    ssmax_init: float | None = param(None, "SSMax: initial s_h of every head; default 1 / log(block_size) with --qk-norm "
                                     "(SSMax then starts neutral at the training length), 1 without", "(0, inf)")
    rope: str | None = param(None, "rotary embeddings: none | full | partial (p-RoPE); default partial for scaleinv, else none",
                             choices=ROPE_MODES)
    rope_fraction: float | None = param(None, "p-RoPE: fraction of rotary pairs (the highest frequencies) that rotate; "
                                        "default: those whose wavelength fits in block_size", "[0, 1]")
    rope_base: float = param(10000.0, "rotary base", "(0, inf)")
    scaleinv_tau: float = param(10.0, "scale-invariant attention's tau", "(0, inf)")
    prior_per_layer: bool = param(False, "one positional prior per layer instead of one shared by all layers")
    prev_tokens: int = param(3, "previous-token path: each embedding mixes in this many embeddings before it (0: off)",
                             "[0, inf)")
    key_offset: bool = param(True, "previous-token path: half of each head's key dimensions come from the token before")
    engine: str = param("auto", "attention engine: auto | sdpa | flex | chunked", choices=ENGINES)
    attn_block: int = param(512, "tile size of the chunked engine (its memory grows with its square)", "[1, inf)")
    prior_grad: str = param("auto", "how the prior's and SSMax's parameters get their gradient: passes (flex and "
                            "chunked: exact, from one more attention pass; no atomics) | table (autograd through the "
                            "tables the score function reads: flex sums it with atomics, sdpa through the T x T bias) | "
                            "auto (passes on flex, table on chunked, where it is faster on a CPU); auto and passes run "
                            "sdpa on a CPU on its fused kernel, the bias's gradient summed along its diagonals",
                            choices=PRIOR_GRADS)

    def __post_init__(self):
        check_fields(self)  # types, ranges and choices, as a flag or a config file gets them
        if self.ssmax is None:
            self.ssmax = self.attention == "bam"
        if self.rope is None:
            self.rope = "partial" if self.attention == "scaleinv" else "none"
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head size (n_embd / n_head) must be even for rotary")
        if self.ssmax_init is None:  # QK-norm gives the logits unit scale: s_h = 1 made them too hot (docs/findings.md)
            self.ssmax_init = 1 / math.log(max(2, self.block_size)) if self.qk_norm else 1.0
        if self.rope_fraction is None:  # resolved here, so the checkpoint stores the fraction it trained with
            self.rope_fraction = fitted_rope_fraction(self.n_embd // self.n_head, self.rope_base, self.block_size)


@dataclass
class KVCache:
    """What decoding keeps between forwards (GPT.generate): per layer the keys and values so far (at
    their true positions: rotary applied) and the last token's key half (CausalSelfAttention.offset_keys),
    the last prev_tokens embeddings (GPT.mix_previous), and how many tokens are cached, which is
    the position of the next one."""
    keys: list
    values: list
    last_key_half: list
    past_embeddings: torch.Tensor | None = None
    length: int = 0

    @classmethod
    def empty(cls, n_layer):
        return cls([None] * n_layer, [None] * n_layer, [None] * n_layer)

    def extend(self, layer, k, v):
        """This forward's keys and values appended to the layer's; returns all of them."""
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def attend(q, k, v, args, ssmax=None, q_offset=0):
    """Causal attention of q (B, H, Tq, D) over k, v (B, H, Tk, D) as `args` (attention.AttentionArgs)
    says, with the SSMax factor ssmax (B, H, Tq) or None; q_offset: the absolute position of the first
    query (Tk - Tq with a KV cache). An 'auto' engine is resolved here (GPT.attention_args resolves
    it once per forward); sdpa runs here (a trained prior on a CPU through engines/diagonal.py), flex,
    chunked and the exact route in engines/."""
    B, H, Tq, _ = q.shape
    plain = plain_attention(args.variant, ssmax is not None, args.doc is not None)
    engine = choose_engine(args.engine, plain, q.device, B, H, Tq, k.shape[2], not torch.is_grad_enabled())
    if engine != "sdpa" or args.derivatives is not None:
        return engines.attend(q, k, v, args, ssmax, q_offset, engine)
    if args.diagonal:  # sdpa's fused CPU kernel; the prior's gradient summed along the bias's diagonals
        return diagonal_attention(q, k, v, *affine_tables(args.variant, args.tables, H, Tq, q.device), ssmax, args.doc)
    score_mod = make_score_mod(args.variant, args.tables, ssmax, q_offset)
    return sdpa_attention(q, k, v, args.variant, args.tables, score_mod, ssmax, args.doc, q_offset)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.config = config
        self.layer = layer  # its slot in a KVCache
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        head_dim = config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        if config.ssmax:
            self.ssmax_scale = nn.Parameter(torch.full((config.n_head,), config.ssmax_init))  # s_h
        if config.rope != "none":
            fraction = 1.0 if config.rope == "full" else config.rope_fraction
            self.register_buffer("inv_freq", rotary_frequencies(head_dim, config.rope_base, fraction), persistent=False)

    def forward(self, x, args, cache=None, queries_from=0):
        """args: the AttentionArgs of this layer (GPT.attention_args); queries_from: only the queries
        from this position on are computed (keys and values from every position); the output then has
        T - queries_from rows."""
        B, T, C = x.shape
        doc = args.doc
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if self.qk_norm:  # rms_norm runs in float32 under CUDA autocast: back to v's dtype for the kernels
            q, k = F.rms_norm(q, (q.size(-1),)).to(v.dtype), F.rms_norm(k, (k.size(-1),)).to(v.dtype)
        past = 0 if cache is None else cache.length
        if self.config.key_offset:
            k = self.offset_keys(k, doc, cache, self.layer)
        if self.config.rope != "none":
            positions = torch.arange(past, past + T, device=x.device)
            q, k = apply_rotary(q, positions, self.inv_freq), apply_rotary(k, positions, self.inv_freq)
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        q, q_offset = q[:, :, queries_from:], past + queries_from
        ssmax = ssmax_factor(self.ssmax_scale, B, q.shape[2], q_offset, doc) if self.config.ssmax else None
        y = attend(q, k, v, args, ssmax, q_offset)
        return self.dropout(self.c_proj(y.transpose(1, 2).reshape(B, q.shape[2], C)))

    @staticmethod
    def offset_keys(k, doc, cache, layer):
        """The second half of each head's key dimensions taken from the previous token (a partial
        key offset, as in modded-nanogpt): key j then says what came before j, so a query can
        find "the token after the one like me" by plain similarity, the induction pattern that
        retrieval needs. Nothing crosses a document boundary; with a KV cache the first new
        token takes the last cached token's."""
        half = k.size(-1) // 2
        last = cache.last_key_half[layer] if cache is not None else None
        previous = torch.cat([torch.zeros_like(k[:, :, :1, half:]) if last is None else last, k[:, :, :-1, half:]], dim=2)
        if cache is not None:
            cache.last_key_half[layer] = k[:, :, -1:, half:]
        if doc is not None:
            previous = previous * (positions_in_document(doc)[:, -k.size(2):] > 0)[:, None, :, None]
        return torch.cat([k[..., :half], previous], dim=-1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, args, cache=None, queries_from=0):
        x = x[:, queries_from:] + self.attn(self.ln_1(x), args, cache, queries_from)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        if config.prev_tokens:
            weight = torch.zeros(config.prev_tokens + 1, config.n_embd)  # (K + 1, C)
            weight[0] = 1  # w_0 = 1, w_k = 0: at init each token is its plain embedding
            self.prev_weight = nn.Parameter(weight)
        self.blocks = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.ln_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # the positional prior, built after the init above so that it keeps its own: one shared by all
        # layers (BAM's "global prior"), or one per layer; registered last (param_groups relies on it)
        n_priors = config.n_layer if config.prior_per_layer else 1
        self.positional = nn.ModuleList([VARIANTS[config.attention](config) for _ in range(n_priors)])
        problem = contract_problem(self.positional[0], config.n_head)
        if problem:
            raise ValueError(f"attention {config.attention!r} breaks the prior contract: {problem} (README, "
                             f"\"Adding a prior\": a score may depend on the logit, the head and the distance only)")
        self.exact_prior_grad = config.prior_grad != "table" and self.prior_route_ok()
        # the parameters whose derivative is the prior itself share its pass (prior_grad.prior_repeats)
        self.prior_repeats = engines.prior_repeats(self.positional[0], config.n_head) if self.exact_prior_grad else ()

    def prior_route_ok(self):
        """Whether engines/prior_grad.py's exact route can give the trained positional parameters and the
        SSMax scale their gradients; if it cannot, says why (they then go through the tables)."""
        variant, c = self.positional[0], self.config
        if not c.ssmax and not any(p.requires_grad for p in variant.parameters()):
            return False  # nothing trained: the plain path is the same
        problem = engines.route_problem(variant, c.n_head)
        if problem:
            print(f"note: --prior-grad passes does not apply to {c.attention} ({problem}); its parameters and the "
                  f"SSMax scale get their gradient through the tables")
        return problem is None

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def mix_previous(self, x, doc, cache):
        """x'_t = sum_k w_k * x_{t-k}, k = 0..prev_tokens, w_k a learned vector per offset (a causal
        depthwise convolution over the embeddings, as Canon layers do; w_0 = 1, the rest 0 at
        init). Every token then carries the few tokens before it, so one attention layer can
        match "the tokens before you are the ones before me" and copy: an induction head without
        first learning a previous-token head, which a tiny model does not manage in minutes
        (docs/findings.md, "Retrieval"). Nothing crosses a document boundary; with a KV cache the first new
        tokens mix with the last cached ones."""
        K, (B, T, C) = self.config.prev_tokens, x.shape
        past = cache.past_embeddings if cache is not None else None
        padded = torch.cat([x.new_zeros(B, K, C) if past is None else past, x], dim=1)
        if cache is not None:
            cache.past_embeddings = padded[:, -K:]
        position = positions_in_document(doc).unsqueeze(-1) if doc is not None else None
        out = x * self.prev_weight[0]
        for k in range(1, K + 1):
            previous = padded[:, K - k:K - k + T]
            out = out + self.prev_weight[k] * (previous if position is None else previous * (position >= k))
        return out

    def attention_args(self, B, T, n_keys, doc, device, queries_from=0):
        """Each layer's AttentionArgs, made once per forward, outside the layer loop (so torch.compile
        sees one graph): each prior's tables, the engine, flex's block mask, and the derivative tables
        when engines/prior_grad.py's exact route trains the prior (flex with --prior-grad auto or passes, chunked
        with passes; training only), and whether sdpa on a CPU takes engines/diagonal.py (auto or passes). The
        last layer's queries start at queries_from: its own engine."""
        c = self.config
        plain = plain_attention(self.positional[0], c.ssmax, doc is not None)
        inference = not torch.is_grad_enabled()
        engine = choose_engine(c.engine, plain, device, B, c.n_head, T, n_keys, inference)
        block_mask = engines.flex_block_mask(B, T, n_keys, n_keys - T, doc, device) if engine == "flex" else None
        exact = self.exact_prior_grad and not inference and n_keys == T and (
            engine == "flex" or engine == "chunked" and c.prior_grad == "passes")
        prior = self.positional[0]
        diagonal = (c.prior_grad != "table" and engine == "sdpa" and device.type == "cpu" and not inference
                    and n_keys == T and (prior.additive or getattr(prior, "affine", False)))
        shared = []
        for p in self.positional:
            tables = p(n_keys, device)
            derivatives = engines.derivative_tables(p, c.n_head, n_keys, device, self.prior_repeats) if exact else None
            shared.append(AttentionArgs(p, tables, doc, engine, c.attn_block, block_mask, derivatives,
                                        diagonal and bool(tables)))
        layers = [shared[i % len(shared)] for i in range(c.n_layer)]
        if queries_from:
            engine = choose_engine(c.engine, plain, device, B, c.n_head, T - queries_from, n_keys, inference)
            layers[-1] = replace(layers[-1], engine=engine, block_mask=None, diagonal=False)
        return layers

    def hidden_states(self, idx, doc=None, cache=None, queries_from=0):
        """Final-norm hidden states (B, T - queries_from, C). doc: (B, T) document ids for document
        masking; cache: a KVCache from new_cache(), extended in place; queries_from: the first
        position whose state is needed (the last layer computes no query before it)."""
        B, T = idx.shape
        n_keys = T + (cache.length if cache is not None else 0)
        layer_args = self.attention_args(B, T, n_keys, doc, idx.device, queries_from)
        x = self.wte(idx)
        x = self.drop(self.mix_previous(x, doc, cache) if self.config.prev_tokens else x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, layer_args[i], cache, queries_from if i == last else 0)
        if cache is not None:
            cache.length = n_keys
        return self.ln_f(x)

    def forward(self, idx, targets=None, doc=None, logits_at=None, cache=None):
        """Like nanoGPT: with targets, logits everywhere and the mean cross-entropy (ignore -1);
        without, logits at the last position only, or at the positions `logits_at` lists
        (long evaluation must never build a T x vocab tensor)."""
        if targets is not None:
            x = self.hidden_states(idx, doc, cache)
            logits = self.lm_head(x)
            # mean over the counted targets (-1: not counted, e.g. outside a loss mask); 0 if none is
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction="sum") / (targets != -1).sum().clamp(min=1)
            return logits, loss
        # the last layer computes queries from the first scored position on only (eagerly: compiled, a
        # symbolic query offset is what Inductor's CPU flex lowering cannot take)
        first = 0 if torch.compiler.is_compiling() else idx.shape[1] - 1 if logits_at is None else int(logits_at.min())
        x = self.hidden_states(idx, doc, cache, queries_from=first)
        x = x[:, -1:] if logits_at is None else x[:, logits_at - first]
        return self.lm_head(x), None

    def new_cache(self):
        return KVCache.empty(len(self.blocks))

    def param_groups(self, weight_decay, decay_embeddings=True, prior_lr_scale=1.0):
        """AdamW groups: decay weight matrices only. Norms and SSMax scales (1-D) never decay, the (tied)
        embedding does if decay_embeddings, and the positional prior's parameters (whatever their shape)
        form a third group that never decays and learns at prior_lr_scale x the learning rate ("lr_scale",
        which train.py applies). The prior's parameters come last in named_parameters, so the three
        groups list the parameters in the order the two groups of older checkpoints did."""
        prior = [p for p in self.positional.parameters() if p.requires_grad]
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or any(p is q for q in prior):
                continue
            is_embedding = name == "wte.weight"
            (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
                {"params": prior, "weight_decay": 0.0, "lr_scale": prior_lr_scale}]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Sample max_new_tokens after idx (B, T). With the KV cache the prompt is prefilled in
        one pass, then each new token attends to the cached keys at their true positions."""
        cache = self.new_cache() if use_cache else None
        step_input = idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_input if use_cache else idx, cache=cache)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
            step_input = next_token
        return idx


def upgraded_config(saved):
    """A checkpoint's model config in today's fields: checkpoints from before the previous-token path
    trained without it, and `bam_per_layer` (per-layer priors for bam only) became `prior_per_layer`."""
    saved = {"prev_tokens": 0, "key_offset": False} | saved
    if "bam_per_layer" in saved:
        saved["prior_per_layer"] = saved.pop("bam_per_layer") and saved.get("attention") == "bam"
    return saved


def load_checkpoint(path, device="cpu", runtime=None):
    """Load a checkpoint and rebuild its model on `device`; runtime: settings of how the model runs, not
    of what it computes (RUNTIME_FIELDS), that replace the checkpoint's before the model is built.
    Every tensor is read to the CPU first: the random states stay there, where torch.set_rng_state
    takes them, and the optimizer's state moves to its parameters' device when it is loaded.
    Returns (model, checkpoint dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one with python train.py --out-dir ...")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["model_config"] = upgraded_config(checkpoint["model_config"])
        unknown = set(checkpoint["model_config"]) - {f.name for f in fields(GPTConfig)}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        model = GPT(GPTConfig(**checkpoint["model_config"] | (runtime or {})))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError, struct.error) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError):  # torch's own message would suggest weights_only=False
            first_line = "not a PyTorch file of tensors and plain values"
        raise ValueError(f"{path} is not a checkpoint of this project's GPT ({first_line})") from None
    return model.to(device), checkpoint
