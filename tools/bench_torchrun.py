"""
train.py's tokens/s under torchrun next to plain `python train.py`, side by side in one run: the
same flags and data, the launches taking turns round by round, because timings are noisy.

    python tools/bench_torchrun.py                          # plain vs torchrun with 1 process, train.py's defaults
    python tools/bench_torchrun.py --nproc 1,2 --rounds 3   # and 2 processes (on a CPU each gets its share of cores)
    python tools/bench_torchrun.py -- --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024 --batch-size 16

Flags after `--` go to every train.py run (the data must be prepared: python data/prepare.py
synthetic). Each run trains --steps steps into a temporary folder; its figure is the median of
log.jsonl's per-step tokens/s after the first --skip steps (compilation, warmup). Under torchrun a
step's tokens are those of all its processes. Every run gets OMP_NUM_THREADS = the CPU count / its
process count (torchrun alone would set 1).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from common.settings import Parser, flag_type, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args(argv):
    p = Parser(prog="tools/bench_torchrun.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=lambda s: [flag_type(int, "[1, inf)")(n) for n in s.split(",")], default=[1],
                   help="comma list of torchrun process counts, each timed next to plain python train.py (default: 1)")
    p.add_argument("--rounds", type=flag_type(int, "[1, inf)"), default=2, help="turns of every launch (default: 2)")
    p.add_argument("--steps", type=flag_type(int, "[2, inf)"), default=40, help="training steps per run (default: 40)")
    p.add_argument("--skip", type=flag_type(int, "[0, inf)"), default=10,
                   help="first steps left out of the median: compilation and warmup (default: 10)")
    p.add_argument("train_flags", nargs="*", help="after --: flags for train.py")
    args = p.parse_args(argv)
    if args.skip >= args.steps:
        p.error(f"--skip {args.skip} leaves none of the {args.steps} --steps; lower --skip or raise --steps")
    return args


def tokens_per_s(nproc, args):
    """(median tokens/s, train.py's first line: model, device, processes) of one run (nproc 0: plain
    python train.py), or (None, the error that stopped it)."""
    launcher = ([] if nproc == 0 else
                ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, *launcher, "train.py", "--out-dir", out_dir, "--max-steps", str(args.steps),
               "--log-interval", "1", "--eval-interval", str(args.steps), *args.train_flags]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error:" in line] or result.stderr.splitlines()
            return None, (errors or ["no output"])[-1].strip()
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            rates = [r["tokens_per_s"] for r in map(json.loads, f) if r.get("step", 0) > args.skip and "tokens_per_s" in r]
    return statistics.median(rates), result.stdout.splitlines()[0]


def main(argv=None):
    args = get_args(argv)
    launches = [0, *args.nproc]  # 0: plain python train.py
    rates, errors = {n: [] for n in launches}, {}
    for round_ in range(args.rounds):
        for n in launches:
            name = "python train.py" if n == 0 else f"torchrun x {n}"
            print(f"round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
            rate, said = tokens_per_s(n, args)
            if rate is None:
                errors[n] = said
            else:
                rates[n].append(rate)
                if round_ == 0:
                    print(f"  {said}")
    plain = statistics.median(rates[0]) if rates[0] else None
    print(f"\n{'launch':<16} {'processes':>9} {'tokens/s':>12} {'rounds min-max':>20} {'vs plain':>9}")
    for n in launches:
        name, procs = ("python train.py", 1) if n == 0 else ("torchrun", n)
        if not rates[n]:
            print(f"{name:<16} {procs:>9}   failed: {errors[n]}")
            continue
        median = statistics.median(rates[n])
        spread = f"{min(rates[n]):,.0f}-{max(rates[n]):,.0f}"
        ratio = f"{median / plain:.2f}" if plain else "-"
        print(f"{name:<16} {procs:>9} {median:>12,.0f} {spread:>20} {ratio:>9}")
    return 1 if errors else 0


if __name__ == "__main__":
    run_main(main)
