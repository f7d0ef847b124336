"""
Benchmark the positional variants in one run, so that their ratios are fair.

  train  a whole training step at GPT-2 124M shape (12 x 1024 tokens, as nanoGPT's bench.py):
         ms/iter, tokens/s, MFU (nanoGPT's estimate: 6N + 12 L H Q T FLOPs per token)
  attn   attention alone, forward + backward, per engine and variant (H=12, d=64)
  long   one forward of the 124M-shaped model at 64K-512K tokens (B=1, logits at the last
         position only): seconds and peak memory

    python tools/bench.py                                  # GPU: bf16, torch.compile, fused AdamW
    python tools/bench.py --tiny --device cpu              # same code paths on a CPU, in seconds
    python tools/bench.py --sections train --variants nope,bam --out bench.json
    python tools/bench.py --quick                          # a new GPU in minutes: correctness + one step each
    python tools/bench.py --check                          # the full correctness self-check, for users with time

Where a variant trains a prior or an SSMax scale and the engine is flex or chunked, train and attn
time each --prior-grad route in its own row (grad column): passes (prior_grad.py: an exact extra
attention pass) and table (the gradient through the tables, which flex sums with atomics).

On CUDA the train and long sections print the project's H100 targets under their numbers, for the
reader (nothing is asserted). Each long cell runs one untimed forward first (compilation). A cell
that fails (out of memory, an error on a path this GPU never ran) is a row saying so; the other
rows still run, --out is rewritten after every row, and the run exits 1 if a cell raised an error.

--quick checks a GPU in a few minutes, in one PASS/FAIL table, exit 1 on a failure: for every
variant, flex (and flex + passes where the model trains through it) against sdpa in bf16 at head
size 64, T = 130 and 1000, outputs and gradients; then one compiled training step each at GPT-2 124M
shape, tokens/s against nope (both --prior-grad routes for bam). On a CPU: float32, flex forward
only, chunked + passes, and the tiny shape without compile.
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from attention import VARIANTS, AttentionArgs, choose_engine, plain_attention, ssmax_factor
from common.checkpoint import save_json
from common.settings import (Parser, autocast, comma_list, flag_type, gpu_peak, output_file, pick_device, pick_dtype,
                             run_main)
from engines.prior_grad import attend_exact, derivative_tables, prior_repeats
from model import GPT, GPTConfig, attend
from tools import selfcheck

# shapes: GPT-2 124M as in nanoGPT's bench.py, and a tiny one that runs on a CPU in seconds
FULL = dict(model=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, attn_block=512),
            block=1024, batch=12, attn=((1024, 16), (4096, 4)), lengths="64K,256K,512K")
TINY = dict(model=dict(n_layer=2, n_head=2, n_embd=64, vocab_size=320, attn_block=64),
            block=128, batch=4, attn=((128, 4), (256, 2)), lengths="2K,4K")
SECTIONS = ("train", "attn", "long")
ROUTES = ("passes", "table")  # --prior-grad's two ways, timed side by side


def token_counts(text):
    """An argparse type= for the long section's lengths: '64K,256K' -> [65536, 262144]."""
    try:
        counts = [int(s[:-1]) * 1024 if s.upper().endswith("K") else int(s) for s in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"must be a comma list of token counts such as 64K,100000, got {text!r}")
    return counts


def get_args(argv):
    p = Parser(prog="tools/bench.py", description=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: every code path in seconds (CPU-friendly)")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cuda, cuda:N, cpu or mps")
    p.add_argument("--variants", type=comma_list(VARIANTS), default=list(VARIANTS),
                   help=f"comma list of positional variants (default all: {', '.join(VARIANTS)})")
    p.add_argument("--sections", type=comma_list(SECTIONS), default=list(SECTIONS),
                   help="comma list of sections: train, attn, long")
    p.add_argument("--prior-grad", type=comma_list(ROUTES), default=list(ROUTES),
                   help="comma list of the ways a trained prior and SSMax scale get their gradient under flex and "
                        "chunked, timed side by side: passes (exact extra pass), table (through the tables; "
                        "atomics in flex). Default both")
    p.add_argument("--steps", type=flag_type(int, "[1, inf)"),
                   help="timed training steps and timed attention runs (default 20; 2 with --tiny)")
    p.add_argument("--warmup", type=flag_type(int, "[0, inf)"),
                   help="untimed steps/runs before timing, compilation included (default 10; 1 with --tiny)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training model (default: on for CUDA)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="autocast dtype (default: bfloat16 on CUDA, float16 where bf16 is unsupported, else float32)")
    p.add_argument("--peak-tflops", type=flag_type(float, "(0, inf)"),
                   help="peak TFLOP/s for MFU (default: known for H100/H200/A100, else MFU n/a)")
    p.add_argument("--lengths", type=token_counts, help="comma list of token counts for the long section, 64K-style "
                   "suffix allowed (default 64K,256K,512K; 2K,4K with --tiny)")
    p.add_argument("--out", type=output_file, help="also write every number to this JSON file")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--check", action="store_true",
                       help="run the full correctness self-check (selfcheck.py) instead: every engine, dtype, head "
                            "size and length; far longer than --quick")
    modes.add_argument("--quick", action="store_true",
                       help="check a new GPU in minutes instead: correctness of flex (+ passes) for every variant, and "
                            "one compiled 124M training step each, in one PASS/FAIL table")
    return p.parse_args(argv)


def tokens_str(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def fmt(r, key, spec, suffix=""):
    """r[key] formatted, or why the cell has no value (OOM, the error)."""
    return r["error"][:60] if "error" in r else f"{r[key]:{spec}}{suffix}"


def sync(device):
    if device.type in ("cuda", "mps"):  # kernels run asynchronously there: wait before reading the clock
        getattr(torch, device.type).synchronize()


def timed(fn, device, warmup, runs):
    """Median seconds of `runs` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cell(fn, device):
    """fn() with fresh compile caches (no recompile limit across cells). A failure is the cell's result,
    not the end of the run: {"error": "OOM"} out of memory, {"error": "Type: message"} otherwise."""
    torch._dynamo.reset()
    try:
        return fn()
    except torch.OutOfMemoryError:
        return dict(error="OOM")
    except Exception as e:  # e.g. a lowering error on a path this GPU has never run
        return dict(error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# the three measurements

def record(args, results, section, row):
    """Append a row to results[section] and rewrite --out at once (atomically): a run stopped later keeps it."""
    results[section].append(row)
    if args.out:
        save_json(results, args.out)
    return row


def prior_grad_routes(name, engine, args):
    """The --prior-grad routes to time for a variant on an engine: those asked for where they differ
    (flex or chunked, a trained prior or SSMax scale the route can take), else '-' (one row)."""
    config = GPTConfig(attention=name, **(args.shape["model"] | dict(n_layer=1, vocab_size=64)))
    return args.prior_grad if engine in ("flex", "chunked") and GPT(config).exact_prior_grad else ["-"]


def training_engine(name, args):
    """The engine a training step of the variant runs on ('auto' as the model resolves it)."""
    config = GPTConfig(attention=name, **args.shape["model"])
    plain = plain_attention(VARIANTS[name](config), config.ssmax, False)
    T = args.shape["block"]
    return choose_engine("auto", plain, args.device, args.shape["batch"], config.n_head, T, T)


def bench_train(name, route, shape, device, dtype, compile, warmup, steps):
    config = GPTConfig(block_size=shape["block"], attention=name, prior_grad="auto" if route == "-" else route,
                       **shape["model"])
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    train_model = torch.compile(model) if compile else model
    data = torch.randint(config.vocab_size, (shape["batch"], config.block_size + 1), device=device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    losses = []

    def step():
        with autocast(device, dtype):
            _, loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    seconds = timed(step, device, warmup, steps)
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    flops = (6 * model.num_params() + 12 * L * H * Q * T) * x.numel()  # nanoGPT's estimate_mfu
    return dict(ms_per_iter=1e3 * seconds, tokens_per_s=x.numel() / seconds, tflops=flops / seconds / 1e12,
                loss=losses[-1].item())


def bench_attention(name, engine, route, B, T, shape, device, dtype, warmup, runs):
    config = GPTConfig(attention=name, **shape["model"])  # gives the variant its heads and options
    H, D = config.n_head, config.n_embd // config.n_head
    variant = VARIANTS[name](config).to(device)
    backward = engine != "flex" or device.type == "cuda"  # flex has no backward off CUDA
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    scale = torch.ones(H, device=device, requires_grad=backward) if config.ssmax else None  # SSMax s_h
    leaves = [q, k, v, *variant.parameters(), *([] if scale is None else [scale])]
    repeats = prior_repeats(variant, H)  # parameters whose derivative is the prior: one pass less

    def forward():  # as in a training step: tables and SSMax factor from the parameters, then attention
        ssmax = None if scale is None else ssmax_factor(scale, B, T, 0, None)
        tables = variant(T, device)
        if route == "passes":
            return attend_exact(q, k, v, variant, tables, derivative_tables(variant, H, T, device, repeats), ssmax, None,
                                engine, config.attn_block, None)
        return attend(q, k, v, AttentionArgs(variant, tables, engine=engine, block=config.attn_block), ssmax)

    forward = torch.compile(forward) if device.type == "cuda" else forward  # the glue fused, as in the model

    def run():
        with torch.set_grad_enabled(backward):
            y = forward()
            if backward:
                torch.autograd.grad(y.float().sum(), leaves)

    return dict(ms=1e3 * timed(run, device, warmup, runs), mode="fwd+bwd" if backward else "fwd")


def bench_long(name, n, shape, device, dtype):
    engine = "auto" if device.type == "cuda" else "chunked"  # flex on CUDA, tiles elsewhere
    model = GPT(GPTConfig(attention=name, engine=engine, **shape["model"])).to(device).eval()
    idx = torch.randint(model.config.vocab_size, (1, n), device=device)

    def forward():
        with torch.no_grad(), autocast(device, dtype):
            model(idx)  # logits at the last position only: never a T x vocab tensor

    forward()  # untimed: compiles the flex kernels and builds the block mask for this length
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(forward, device, 0, 1)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return dict(seconds=seconds, peak_gb=peak_gb)


# ----------------------------------------------------------------------------------------
# sections: each prints a table as its rows come in and records them in `results`

def train_section(args, results):
    peak = args.peak_tflops
    print(f"\n== train: batch {args.shape['batch']} x block {args.shape['block']}, {args.warmup} warmup + "
          f"{args.steps} timed steps; " + (f"MFU against {args.peak_label} {peak:g} TFLOP/s" if peak
                                           else "MFU n/a (unknown peak: pass --peak-tflops)"))
    print(f"{'variant':10} {'grad':6} {'ms/iter':>9} {'tok/s':>10} {'MFU':>7} {'vs nope':>8}")
    for v in args.variants:
        for route in prior_grad_routes(v, training_engine(v, args), args):
            r = cell(lambda: bench_train(v, route, args.shape, args.device, args.torch_dtype, args.compile,
                                         args.warmup, args.steps), args.device)
            if "error" in r:
                record(args, results, "train", dict(variant=v, prior_grad=route, **r))
                print(f"{v:10} {route:6} {r['error']}")
                continue
            base = next((b for b in results["train"] if b["variant"] == "nope" and "error" not in b),
                        r if v == "nope" else None)
            r["mfu"] = r["tflops"] / peak if peak else None
            r["vs_nope"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            r = record(args, results, "train", dict(variant=v, prior_grad=route, **r))
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            ratio = f"{r['vs_nope']:.2f}" if r["vs_nope"] is not None else "n/a"
            print(f"{v:10} {route:6} {r['ms_per_iter']:9.2f} {r['tokens_per_s'] / 1e3:9.1f}K {mfu:>7} {ratio:>8}")
    if args.device.type == "cuda":
        print("targets (H100): nope >= 480K tok/s (1.1x nanoGPT bench.py's 439K); others >= 0.85x nope")


def attn_section(args, results):
    H = args.shape["model"]["n_head"]
    print(f"\n== attn: attention only, {args.dtype}, H={H}, d={args.shape['model']['n_embd'] // H}, "
          f"median of {args.steps} runs after {args.warmup} warmup"
          + ("; each cell compiled whole (tables, SSMax, attention)" if args.device.type == "cuda"
             else "; eager; flex runs forward only off CUDA"))
    print(f"{'variant':10} {'engine':8} {'grad':6} {'B':>3} {'T':>6} {'mode':>8} {'ms':>10}")
    for T, B in args.shape["attn"]:
        for engine in ("sdpa", "flex", "chunked"):
            for v in args.variants:
                backward = engine != "flex" or args.device.type == "cuda"
                for route in prior_grad_routes(v, engine, args) if backward else ["-"]:
                    r = cell(lambda: bench_attention(v, engine, route, B, T, args.shape, args.device,
                                                     args.torch_dtype, args.warmup, args.steps), args.device)
                    record(args, results, "attention", dict(variant=v, engine=engine, prior_grad=route, B=B, T=T, **r))
                    print(f"{v:10} {engine:8} {route:6} {B:3d} {T:6d} {r.get('mode', ''):>8} {fmt(r, 'ms', '10.2f'):>10}")


def long_section(args, results):
    print(f"\n== long: one forward, B=1, logits at the last position, {args.dtype}, "
          f"engine {'auto (flex)' if args.device.type == 'cuda' else 'chunked'}")
    print(f"{'variant':10} {'tokens':>7} {'seconds':>9} {'peak GB':>8}")
    for n in args.lengths:
        for v in args.variants:
            r = cell(lambda: bench_long(v, n, args.shape, args.device, args.torch_dtype), args.device)
            record(args, results, "long", dict(variant=v, tokens=n, **r))
            peak_gb = "" if "error" in r else "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
            print(f"{v:10} {tokens_str(n):>7} {fmt(r, 'seconds', '9.2f'):>9} {peak_gb:>8}")
    if args.device.type == "cuda":
        print("targets (H100): 256K <= 15 s and <= 20 GB; 512K <= 60 s")


def quick(args, results):
    """--quick (module docstring): one PASS/FAIL table; returns the number of failed rows."""
    cuda = args.device.type == "cuda"
    dtype = pick_dtype("auto", args.device, training=True)
    print(f"\n== quick: flex against sdpa ({str(dtype)[6:]}, head size 64, T = 130 and 1000), then one "
          f"{'compiled ' if args.compile else ''}training step each ({'GPT-2 124M' if cuda else 'tiny'} shape)")
    print(selfcheck.row("check", "variant", "setting", "detail", "result"))

    def report(check, variant, setting, r, detail):
        ok = "error" not in r and detail is not None
        record(args, results, "quick", dict(check=check, variant=variant, setting=setting, ok=ok, **r))
        print(selfcheck.row(check, variant, setting, r.get("error", detail), "PASS" if ok else "FAIL"), flush=True)

    for v in args.variants:  # flex + passes only where the model trains through the route
        passes = ["flex+passes" if cuda else "chunked+passes"] * selfcheck.takes_route(v)
        for engine in ["flex", *passes]:
            backward = cuda or engine != "flex"
            r = cell(lambda: dict(errors=[selfcheck.attention_case(v, engine, T, 64, dtype, args.device, backward)
                                          for T in (130, 1000)]), args.device)
            ok = "error" not in r and max(r["errors"]) < selfcheck.TOLERANCE[dtype]
            report("engines", v, f"{engine} {'fwd+bwd' if backward else 'fwd'}", r,
                   "err " + " ".join(f"{e:.0e}" for e in r.get("errors", [])) if ok else None)
    steps = dict(warmup=2, steps=3) if cuda else dict(warmup=1, steps=2)
    for v in args.variants:
        for route in prior_grad_routes(v, training_engine(v, args), args):
            r = cell(lambda: bench_train(v, route, args.shape, args.device, args.torch_dtype, args.compile, **steps),
                     args.device)
            base = next((b for b in results["quick"] if b["check"] == "train" and b["ok"]), None)
            ratio = f", {r['tokens_per_s'] / base['tokens_per_s']:.2f}x {base['variant']}" if base and "error" not in r else ""
            report("train", v, f"grad {route}", r, f"{r['tokens_per_s'] / 1e3:.1f}K tok/s{ratio}, loss {r['loss']:.2f}"
                   if "error" not in r and math.isfinite(r["loss"]) else None)
    failed = sum(not r["ok"] for r in results["quick"])
    print(f"{len(results['quick']) - failed} passed, {failed} failed")
    if cuda:
        print("target (H100): every variant >= 0.85x nope")
    return failed


def summary(args, results):
    """One line per variant: training throughput (per --prior-grad route), fastest engine at the
    longest attention T, seconds of each long forward."""
    print("\n== summary")
    for v in args.variants:
        parts = []
        for r in results["train"]:
            if r["variant"] == v and "error" not in r:
                route = "" if r["prior_grad"] == "-" else f" ({r['prior_grad']})"
                ratio = f", {r['vs_nope']:.2f}x nope" if r["vs_nope"] is not None else ""
                parts.append(f"train{route} {r['tokens_per_s'] / 1e3:.1f}K tok/s{ratio}")
        timed_attn = [a for a in results["attention"] if a["variant"] == v and a.get("mode") == "fwd+bwd"]
        if timed_attn:
            T = max(a["T"] for a in timed_attn)
            best = min((a for a in timed_attn if a["T"] == T), key=lambda a: a["ms"])
            route = "" if best["prior_grad"] == "-" else f" ({best['prior_grad']})"
            parts.append(f"attn T={T} {best['engine']}{route} {best['ms']:.2f} ms")
        parts += [f"{tokens_str(r['tokens'])} {fmt(r, 'seconds', '.2f', ' s')}"
                  for r in results["long"] if r["variant"] == v]
        print(f"{v:10} " + ", ".join(parts))


def main(argv=None):
    args = get_args(argv)
    if args.check:
        sys.exit(selfcheck.main(["--device", args.device, "--variants", ",".join(args.variants)]))
    # resolve the defaults that depend on the device and on --tiny (--quick on a CPU: tiny)
    args.device = pick_device(args.device)
    cuda = args.device.type == "cuda"
    args.shape = TINY if args.tiny or args.quick and not cuda else FULL
    args.torch_dtype = pick_dtype(args.dtype or "auto", args.device)
    args.dtype = str(args.torch_dtype).removeprefix("torch.")
    args.compile = cuda if args.compile is None else args.compile
    args.warmup = (1 if args.tiny else 10) if args.warmup is None else args.warmup
    args.steps = args.steps or (2 if args.tiny else 20)
    args.variants = [v for v in VARIANTS if v in args.variants]  # nope first: the base of the ratios
    args.lengths = args.lengths or token_counts(args.shape["lengths"])
    name = torch.cuda.get_device_name(args.device) if cuda else args.device.type
    label, peak = gpu_peak(name) if cuda else (None, None)
    args.peak_label = label and f"{label} bf16 dense peak"
    if args.peak_tflops:
        args.peak_label = "the given peak"
    args.peak_tflops = args.peak_tflops or peak
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    print(f"device {name}, torch {torch.__version__}, {args.dtype}, compile {args.compile}, "
          f"{'tiny' if args.shape is TINY else 'GPT-2 124M'} shape {args.shape['model']}")
    results = dict(device=name, torch=torch.__version__, dtype=args.dtype, compile=args.compile, tiny=args.tiny,
                   peak_tflops=args.peak_tflops, train=[], attention=[], long=[], quick=[])
    if args.quick:
        failed = quick(args, results)
    else:
        for section, run in (("train", train_section), ("attn", attn_section), ("long", long_section)):
            if section in args.sections:
                run(args, results)
        summary(args, results)
        errors = [r for rows in (results["train"], results["attention"], results["long"]) for r in rows
                  if r.get("error", "OOM") != "OOM"]
        for r in errors:
            print(f"error in a cell ({', '.join(str(r[k]) for k in ('variant', 'engine', 'T', 'tokens') if k in r)}): "
                  f"{r['error']}")
        failed = len(errors)
    if args.out:
        save_json(results, args.out)
        print(f"wrote {args.out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
