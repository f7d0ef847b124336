"""
Check a GPU end to end before trusting it with a run: python tools/bench.py --check (or python tools/selfcheck.py).

  engines  flex and chunked against sdpa (float32 math) for every variant, documents masked,
           at lengths 1, 130 and 1000, float32 and bfloat16, head sizes 64 and 128: outputs and
           the gradients of q, k, v, the prior's parameters and the SSMax scale; "+passes" rows
           take those gradients from prior_grad.py's exact extra pass (flex on CUDA, chunked here)
  decode   KV-cache generation (flex prefill, sdpa decoding) against full recomputation
  compile  the whole model under torch.compile: one graph, no break, per variant; one training
           step (forward, backward, AdamW) matching the eager loss; frames compiled over 6
           evaluation lengths
  64K      one forward of the GPT-2 124M shape at 65,536 tokens with flex, and its peak memory

Prints one PASS/FAIL table and exits non-zero on any failure. On a CPU it runs what a CPU can:
flex forward only (no backward off CUDA), no bfloat16 kernels, no 64K forward.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from attention import VARIANTS, AttentionArgs, ssmax_factor
from common.settings import Parser, autocast, comma_list, native_bf16, pick_device, run_main
from engines.prior_grad import attend_exact, derivative_tables, prior_repeats
from model import GPT, GPTConfig, attend

LENGTHS = (1, 130, 1000)
CHECKS = ("engines", "decode", "compile", "64K")
# worst error relative to the largest reference value (at least 0.01: at T = 1 the gradients of q and k
# are 0). Both runs get the same rounded inputs; bf16 kernels still round P to 8 bits, and SSMax's
# log(n) factor sharpens attention: bam's bf16 gradients differed by up to 4e-2 on an H100.
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


def row(check, variant, setting, detail, result):
    """One line of the PASS/FAIL table (bench.py --quick prints the same)."""
    return f"  {check:8} {variant:9} {setting:38} {detail:34} {result}"


def relative_error(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-2)).item()


def attention_case(name, engine, T, D, dtype, device, backward):
    """Worst relative error of one engine against sdpa in float32 over outputs and gradients."""
    H, B = 4, 2
    config = GPTConfig(attention=name, n_head=H, n_embd=H * D)
    variant = VARIANTS[name](config).to(device)
    if name == "bam":
        with torch.no_grad():
            variant.theta_beta.copy_(torch.tensor([1.0, 0.5, -0.3, 2.0]))  # local and retrieval heads
    torch.manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, device=device) for _ in range(3))
    doc = torch.sort(torch.randint(0, 3, (B, T), device=device), dim=1).values
    scale = torch.linspace(0.8, 1.2, H, device=device) if config.ssmax else None
    repeats = prior_repeats(variant, H)  # parameters whose derivative is the prior: one pass less

    def run(engine, dtype):  # inputs rounded to `dtype` in both runs: the error is the kernel's own
        leaves = [x.to(dtype).to(dtype if engine != "sdpa" else torch.float32).requires_grad_(backward)
                  for x in (q, k, v)]
        params = [p for p in variant.parameters()] + ([] if scale is None else [scale.requires_grad_(backward)])
        with torch.set_grad_enabled(backward):
            ssmax = None if scale is None else ssmax_factor(scale, B, T, 0, doc)  # float32, as in the model
            if engine.endswith("+passes"):
                derivatives = derivative_tables(variant, H, T, device, repeats)
                y = attend_exact(*leaves, variant, variant(T, device), derivatives, ssmax, doc, engine.split("+")[0], 256,
                                 None)
            else:
                y = attend(*leaves, AttentionArgs(variant, variant(T, device), doc, engine, 256), ssmax)
            if not backward:
                return [y]
            grads = torch.autograd.grad((y.float() * torch.cos(y.float())).sum(), leaves + params)
        return [y] + list(grads)

    want, got = run("sdpa", dtype), run(engine, dtype)
    return max(relative_error(a, b) for a, b in zip(got, want))


def takes_route(name):
    """Whether a model of the variant trains through prior_grad.py's exact route (GPT.exact_prior_grad)."""
    return GPT(GPTConfig(attention=name, n_layer=1, n_head=4, n_embd=256, vocab_size=64)).exact_prior_grad


def decode_case(name, device):
    """Largest logit difference between cached decoding and recomputation, float32."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention=name, n_layer=2, n_head=4, n_embd=256, vocab_size=512)).to(device).eval()
    seq = torch.randint(512, (1, 300), device=device)
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(seq[:, :200], cache=cache, logits_at=torch.arange(200, device=device))[0]]
        steps += [model(seq[:, t:t + 1], cache=cache)[0] for t in range(200, 300)]
        full = model(seq, logits_at=torch.arange(300, device=device))[0]
    return relative_error(torch.cat(steps, dim=1), full)


def compile_case(name, device, dtype):
    """(graphs, breaks, relative loss difference of a compiled training step, frames compiled over
    6 evaluation lengths)."""
    torch.manual_seed(0)
    config = GPTConfig(attention=name, n_layer=2, n_head=4, n_embd=256, vocab_size=512, block_size=1024)
    model = GPT(config).to(device)
    x = torch.randint(512, (4, 1024), device=device)
    doc = (x % 97 == 0).cumsum(dim=1)  # a few documents per row
    explained = torch._dynamo.explain(model)(x, x, doc=doc)
    torch._dynamo.reset()
    mixed = autocast(device, dtype)
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for m in (model, compiled):
        with mixed:
            losses.append(m(x, x, doc=doc)[1])
    losses[1].backward()
    optimizer.step()
    loss_diff = abs(losses[1].item() - losses[0].item()) / abs(losses[0].item())
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad(), mixed:
        for T in (300, 1000, 1500, 2222, 3000, 4096):
            compiled(torch.randint(512, (1, T), device=device))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
    return explained.graph_count, explained.graph_break_count, loss_diff, frames


def long_case(device, dtype):
    """(seconds, peak GB) of one bam forward at 64K tokens, GPT-2 124M shape, flex."""
    model = GPT(GPTConfig(attention="bam", n_layer=12, n_head=12, n_embd=768, vocab_size=50304)).to(device).eval()
    idx = torch.randint(50304, (1, 65536), device=device)
    with torch.no_grad(), autocast(device, dtype):
        model(idx)  # compiles
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model(idx)
        torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 1e9


def main(argv=None):
    p = Parser(prog="tools/selfcheck.py", description=__doc__)
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cuda, cuda:N or cpu")
    p.add_argument("--variants", type=comma_list(VARIANTS), default=list(VARIANTS),
                   help="comma list of variants (default: all)")
    p.add_argument("--checks", type=comma_list(CHECKS), default=list(CHECKS),
                   help=f"comma list of checks (default: all: {', '.join(CHECKS)})")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    variants, checks = args.variants, args.checks
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a float32 reference
    dtypes = [torch.float32] + ([torch.bfloat16] if cuda and native_bf16() else [])
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"self-check on {name}, torch {torch.__version__}" + ("" if cuda else ": CPU, flex forward only"))
    rows, failed = [], 0

    def report(check, variant, setting, detail, ok):
        nonlocal failed
        failed += not ok
        rows.append((check, variant, setting, detail, "PASS" if ok else "FAIL"))
        print(row(*rows[-1]), flush=True)

    def guarded(check, variant, setting, fn):
        try:
            fn()
        except Exception as e:  # a failing kernel is a FAIL row, not the end of the check
            report(check, variant, setting, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}", False)

    print(row("check", "variant", "setting", "detail", "result"))
    for v in variants:
        passes = ["flex+passes" if cuda else "chunked+passes"] * takes_route(v)  # the exact prior gradient route
        for engine in ["flex", "chunked", *passes] if "engines" in checks else ():
            for dtype in dtypes:
                for D in (64, 128):
                    def engines(v=v, engine=engine, dtype=dtype, D=D):
                        torch._dynamo.reset()  # each dtype and head size compiles flex anew: no recompile limit
                        backward = cuda or not engine.startswith("flex")
                        errors = [attention_case(v, engine, T, D, dtype, device, backward) for T in LENGTHS]
                        report("engines", v, f"{engine} {str(dtype)[6:]} hs={D} {'fwd+bwd' if backward else 'fwd'}",
                               "err " + " ".join(f"{e:.0e}" for e in errors) + f" (T={','.join(map(str, LENGTHS))})",
                               max(errors) < TOLERANCE[dtype])
                    guarded("engines", v, f"{engine} {str(dtype)[6:]} hs={D}", engines)
        def decode(v=v):
            error = decode_case(v, device)
            report("decode", v, "KV cache vs recompute, fp32", f"err {error:.0e}", error < 1e-4)
        if "decode" in checks:
            guarded("decode", v, "KV cache vs recompute", decode)
        if cuda and "compile" in checks:
            def compiled(v=v):
                torch._dynamo.reset()
                graphs, breaks, loss_diff, frames = compile_case(v, device, dtypes[-1])
                report("compile", v, f"train step {str(dtypes[-1])[6:]}, 6 lengths",
                       f"{graphs} graph, {breaks} breaks, dloss {loss_diff:.0e}, {frames} frames",
                       graphs == 1 and breaks == 0 and loss_diff < 2e-2 and frames <= 3)
            guarded("compile", v, "train step", compiled)
    if cuda and "64K" in checks:
        def long():
            seconds, peak = long_case(device, dtypes[-1])
            report("64K", "bam", f"124M shape, 1 x 65536, {str(dtypes[-1])[6:]}", f"{seconds:.2f} s, peak {peak:.2f} GB",
                   peak < 20)
        guarded("64K", "bam", "124M forward", long)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
