"""
The CPU figures of the main job (./run.sh), side by side in one run, because CPU timings are noisy.

  matmul  a float32 1024 x 1024 matmul: the machine's rate, the yardstick of the others
  train   one AdamW training step, batch 16, of the main job's model (4 layers, 4 heads, 128 wide) for
          every variant, at T = 128 (the main job), 384 and 1024, next to a nanoGPT-shaped model (learned
          positions, LayerNorm and biases, plain causal attention) of the same size on the same data,
          to NoPE with SSMax and NoPE without the previous-token path (what those cost), and to bam and
          scaleinv with --prior-grad table (autograd through the T x T bias or logits: the route before
          engines/diagonal.py)
  profile where one training step's time goes, per model of the train section (not run by default):
          torch.profiler's operators by their own CPU time, the largest of them
  long    one 64x passkey prompt (8192 tokens, answer logits only) of the main job's model per
          variant: before (chunked_attention, the tiles autograd uses, every layer's every query) and
          now (the inference tiles, the last layer's queries from the answer on), every variant in turn,
          round after round; seconds, the ratio to nope's, and the attention's GFLOP/s (of the queries
          computed) as a fraction of the matmul rate

    python tools/bench_cpu.py                       # matmul, train and long: 10-15 minutes on 2 cores (T = 1024 most of it)
    python tools/bench_cpu.py --lengths 128,384     # training at the shorter lengths only, about a minute
    python tools/bench_cpu.py --sections train --compile   # training with every model compiled, as nanoGPT does
    python tools/bench_cpu.py --sections long --variants bam --out bench_cpu.json
    python tools/bench_cpu.py --sections profile --variants bam --lengths 384,1024
"""
import os
import statistics
import sys
import time
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import engines
from attention import VARIANTS
from common.checkpoint import save_json
from common.settings import Parser, comma_ints, comma_list, flag_type, output_file, run_main
from model import GPT, GPTConfig

SECTIONS = ("matmul", "train", "long", "profile")
MAIN_JOB = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=320)  # train.py's defaults, as ./run.sh trains
BATCH = 16


def median_seconds(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / median_seconds(lambda: a @ b, 5, 20) / 1e9


class NanoGPTShaped(nn.Module):
    """The model nanoGPT trains, at the main job's size: token + learned position embeddings,
    LayerNorm with biases, biased linears, GELU MLP, causal sdpa, tied head. A yardstick only."""

    def __init__(self, n_layer, n_head, n_embd, vocab_size, block_size):
        super().__init__()
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(n_embd), qkv=nn.Linear(n_embd, 3 * n_embd), proj=nn.Linear(n_embd, n_embd),
            ln_2=nn.LayerNorm(n_embd), fc=nn.Linear(n_embd, 4 * n_embd), fc_proj=nn.Linear(4 * n_embd, n_embd)))
            for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.blocks:
            q, k, v = b.qkv(b.ln_1(x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            x = x + b.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1))
            x = x + b.fc_proj(F.gelu(b.fc(b.ln_2(x)), approximate="tanh"))
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def batch_at(T):
    data = torch.randint(MAIN_JOB["vocab_size"], (BATCH, T + 1))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def models_to_train(args, T):
    """(name, model, optimizer) of every row of the train section at length T."""
    rows = [("nanoGPT-shaped", None)] + [(v, {}) for v in args.variants] + [
        ("nope + SSMax", dict(attention="nope", ssmax=True)),
        ("nope, no prev-token path", dict(attention="nope", prev_tokens=0, key_offset=False))] + [
        (f"{v}, --prior-grad table", dict(attention=v, prior_grad="table")) for v in ("bam", "scaleinv")
        if v in args.variants]
    models = []
    for name, overrides in rows:
        torch.manual_seed(0)
        model = (NanoGPTShaped(block_size=T, **MAIN_JOB) if overrides is None else
                 GPT(GPTConfig(block_size=T, **MAIN_JOB, **({"attention": name} | overrides))))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        models.append((name, torch.compile(model) if args.compile else model, optimizer))
    return models


def train_step(model, optimizer, x, y):
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_section(args, results):
    """Every model's step timed in turn, round after round, so that they share the machine's drift."""
    print(f"\n== train: batch {BATCH}, one AdamW step (fwd + bwd + update), {args.steps} rounds of one step per "
          f"model in turn after 2 warmup{', every model torch.compiled' if args.compile else ''}; median tokens/s "
          f"and the ratio to the nanoGPT-shaped model")
    torch._dynamo.config.recompile_limit = 64  # every model is another specialization of the same forward
    for T in args.lengths:
        x, y = batch_at(T)
        models = models_to_train(args, T)
        times = [[] for _ in models]
        for round in range(2 + args.steps):
            for i, (_, model, optimizer) in enumerate(models):
                t0 = time.perf_counter()
                train_step(model, optimizer, x, y)
                if round >= 2:
                    times[i].append(time.perf_counter() - t0)
        base = BATCH * T / statistics.median(times[0])
        for (name, _, _), seconds in zip(models, times):
            tokens_per_s = BATCH * T / statistics.median(seconds)
            results["train"].append(dict(model=name, T=T, tokens_per_s=tokens_per_s, vs_nanogpt=tokens_per_s / base))
            print(f"T={T:<4} {name:30} {tokens_per_s / 1e3:8.1f}K tok/s {tokens_per_s / base:6.2f}x", flush=True)


def profile_section(args, results):
    """Where one training step of every model goes: torch.profiler's operators by their own CPU time."""
    print(f"\n== profile: one training step of every model (batch {BATCH}) after 2 warmup; the operators' own CPU "
          f"time, in ms: all of them, then the {args.top} largest")
    for T in args.lengths:
        x, y = batch_at(T)
        for name, model, optimizer in models_to_train(args, T):
            for _ in range(2):
                train_step(model, optimizer, x, y)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                train_step(model, optimizer, x, y)
            ops = {e.key.removeprefix("aten::"): e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
            top = sorted(ops.items(), key=lambda op: -op[1])[:args.top]
            results["profile"].append(dict(model=name, T=T, total_ms=sum(ops.values()), top_ms=dict(top)))
            print(f"T={T:<4} {name:30} {sum(ops.values()):7.0f}: " + ", ".join(f"{op} {ms:.0f}" for op, ms in top),
                  flush=True)


def attention_flops(config, T, queries_in_last_layer):
    """Matmul FLOPs of causal attention (q.k and p.v) over the queries a forward computes."""
    def seen(first, last):  # keys seen by the queries first .. last - 1: sum of (i + 1)
        return (last * (last + 1) - first * (first + 1)) // 2
    per_key = 4 * config.n_embd  # 2 matmuls x 2 FLOPs x head size x heads
    return per_key * ((config.n_layer - 1) * seen(0, T) + seen(T - queries_in_last_layer, T))


def long_section(args, results, matmul):
    """Every variant's prompt timed in turn, round after round, as in the train section."""
    T, answer = 64 * 128, 6  # the main job's 64x; logits at the last 6 positions, as a 5-digit key
    print(f"\n== long: one 64x passkey-length prompt ({T} tokens), the main job's model, answer logits, {args.steps} "
          f"rounds of one prompt per variant in turn after 1 warmup; median seconds, the ratio to nope's, and attention "
          f"GFLOP/s (fraction of the matmul's {matmul:.0f})")
    print(f"{'variant':10} {'before s':>9} {'now s':>8} {'speedup':>8} {'vs nope':>8} {'GFLOP/s':>8} {'of matmul':>10}")
    idx, positions = torch.randint(MAIN_JOB["vocab_size"], (1, T)), torch.arange(T - answer, T)
    models, before, times = {}, {}, {v: [] for v in args.variants}
    with torch.no_grad():
        for v in args.variants:
            torch.manual_seed(0)
            models[v] = model = GPT(GPTConfig(attention=v, block_size=128, engine="chunked", **MAIN_JOB)).eval()
            with mock.patch.object(engines, "affine_tables", lambda *a: None):  # the tiles autograd uses, every query
                before[v] = median_seconds(lambda: model.lm_head(model.hidden_states(idx)[:, positions]), 0, 1)
        for round in range(1 + args.steps):
            for v, model in models.items():
                t0 = time.perf_counter()
                model(idx, logits_at=positions)
                if round:
                    times[v].append(time.perf_counter() - t0)
    for v, model in models.items():
        now = statistics.median(times[v])
        vs_nope = now / statistics.median(times["nope"]) if "nope" in times else float("nan")
        gflops = attention_flops(model.config, T, answer) / now / 1e9
        results["long"].append(dict(variant=v, tokens=T, seconds_before=before[v], seconds=now, vs_nope=vs_nope,
                                    attention_gflops=gflops, of_matmul=gflops / matmul))
        print(f"{v:10} {before[v]:9.2f} {now:8.2f} {before[v] / now:7.1f}x {vs_nope:7.2f}x {gflops:8.0f} "
              f"{gflops / matmul:10.2f}", flush=True)


def main(argv=None):
    p = Parser(prog="tools/bench_cpu.py", description=__doc__)
    p.add_argument("--sections", type=comma_list(SECTIONS), default=["matmul", "train", "long"],
                   help="comma list of sections: matmul, train, long, profile (default matmul,train,long; every "
                        "section prints the matmul rate too)")
    p.add_argument("--variants", type=comma_list(VARIANTS), default=list(VARIANTS),
                   help=f"comma list of positional variants (default all: {', '.join(VARIANTS)})")
    p.add_argument("--lengths", type=comma_ints("[1, inf)"), default=[128, 384, 1024],
                   help="train: comma list of sequence lengths (default 128,384,1024)")
    p.add_argument("--steps", type=flag_type(int, "[1, inf)"), default=10,
                   help="train and long: timed rounds, one step (one prompt) of every model each (default 10)")
    p.add_argument("--compile", action="store_true",
                   help="train: torch.compile every model, the nanoGPT-shaped one too (nanoGPT's default; needs a C++ "
                        "compiler, and about 10-20 s per model on 2 cores)")
    p.add_argument("--top", type=flag_type(int, "[1, inf)"), default=8,
                   help="profile: how many of the largest operators to print per model (default 8)")
    p.add_argument("--out", type=output_file, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    matmul = matmul_gflops()
    results = {"threads": torch.get_num_threads(), "compile": args.compile, "matmul_gflops": matmul, "train": [], "long": [], "profile": []}
    print(f"== matmul: float32 1024 x 1024, {torch.get_num_threads()} threads: {matmul:.0f} GFLOP/s")
    if "train" in args.sections:
        train_section(args, results)
    if "long" in args.sections:
        long_section(args, results, matmul)
    if "profile" in args.sections:
        profile_section(args, results)
    results["matmul_gflops_after"] = matmul_gflops()  # the machine may have changed pace during the run
    print(f"\nmatmul again at the end: {results['matmul_gflops_after']:.0f} GFLOP/s")
    if args.out:
        save_json(results, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
