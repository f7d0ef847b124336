"""
A fair comparison of the positional variants: train a grid of configurations on the same data,
with the same recipe and the same seeds, then evaluate each one beyond the training length.

    python tools/compare.py                          # the default grid (README, "Compare the variants")
    python tools/compare.py --quick                  # does SSMax or the prior decide? nope and bam, on and off, 1 seed
    python tools/compare.py --variants bam,scaleinv --ssmax on --seeds 1,2,3 --lengths 1x,4x,16x,64x
    python tools/compare.py --tasks loss --config config/shakespeare.toml --lengths 1x,4x,16x,32x
    python tools/compare.py --config config/tasks.toml --tasks passkey,latest,first,multikey --ssmax on --curve

A configuration is a variant with SSMax on or off. Variants: nope, rope (nope + full RoPE, the
papers' baseline), alibi, bam and scaleinv (with its p-RoPE unless the recipe's [scaleinv] table
says otherwise: config/compare.toml's trains it without RoPE). Every run trains with the recipe of
--config (config/compare.toml: the main job's recipe; a TOML or JSON file of train.py
settings, read as data; --data, --steps, --block-size and --qk-norm here win over it), and goes to
--out-dir/runs/<variant>-ssmax_<on|off>-seed<S>-<hash of the settings>/. A finished run is reused
and a stopped one resumes; each (run, task, length) result is its own JSON file, so adding a
length or a seed costs only the new part. Ctrl-C or SIGTERM stops the grid (training saves its
step first); the same command continues where it stopped. Prompts depend on the seed only, so
every configuration answers the same prompts. Each retrieval table ends with the configuration's
breaking length: the first length where its mean accuracy falls below 0.5. latest, first and
multikey need data that has them (python data/prepare.py tasks; config/tasks.toml trains on it). --curve keeps every run's
checkpoint at each evaluation and scores each one at the first length: the steps each
configuration needed to learn each task (accuracy >= 0.9), as a table and compare_curve.png.
"""
import argparse
import hashlib
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import eval_extrapolate
import train
from common.checkpoint import save_json
from common.settings import Parser, comma_ints, comma_list, fail, flag_type, run_main
from data.retrieval import task_sample
from data.shards import read_meta, tokenizer_from_meta

# variant name -> train.py flags; rope is NoPE with full rotary embeddings
VARIANT_FLAGS = {"nope": ["--attention", "nope", "--rope", "none"], "rope": ["--attention", "nope", "--rope", "full"],
                 "alibi": ["--attention", "alibi"], "bam": ["--attention", "bam"], "scaleinv": ["--attention", "scaleinv"]}
SSMAX_FLAGS = {"on": ["--ssmax"], "off": ["--no-ssmax"]}
RETRIEVAL = eval_extrapolate.RETRIEVAL_TASKS
TASKS = RETRIEVAL + ("loss",)
GRID = dict(variants=list(VARIANT_FLAGS), ssmax=["on", "off"], seeds=[1337, 7], lengths="1x,4x,16x")
LEARNED = 0.9  # --curve: the accuracy at the first length from which a task counts as learned
BROKEN = 0.5  # a configuration's breaking length: the first length where its mean accuracy falls below this
QUICK = dict(GRID, variants=["nope", "bam"], seeds=[1337], lengths="1x,4x")


def parse_args(argv):
    p = Parser(prog="tools/compare.py", description=__doc__)
    p.add_argument("--variants", type=comma_list(list(VARIANT_FLAGS)),
                   help=f"comma list of variants (default: {','.join(GRID['variants'])})")
    p.add_argument("--ssmax", type=comma_list(list(SSMAX_FLAGS)),
                   help="SSMax settings to train each variant with: on, off or on,off (default: on,off)")
    p.add_argument("--seeds", type=comma_ints("[0, inf)"),
                   help="training seeds; the evaluation's prompts use the same seed (default: 1337,7)")
    p.add_argument("--config", default="config/compare.toml",
                   help="the recipe every run trains with: a TOML or JSON file of train.py settings (default: "
                        "config/compare.toml, the main job's recipe); the flags here win over it")
    p.add_argument("--steps", type=flag_type(int, "[1, inf)"),
                   help="training steps per run, evaluated and saved every third of them, every tenth with --curve "
                        "(default: the recipe's)")
    p.add_argument("--block-size", type=flag_type(int, "[1, inf)"), help="training length in tokens (default: the "
                                                                          "recipe's)")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction,
                   help="QK-norm in every run (default: the recipe's; config/compare.toml has it on: without it the "
                        "SSMax-off models do not learn to retrieve in 600 steps, docs/findings.md)")
    p.add_argument("--data", help="prepared data folder (default: the recipe's, else data/synthetic)")
    p.add_argument("--tasks", type=comma_list(list(TASKS)), default=["passkey"],
                   help=f"comma list of {', '.join(TASKS)}; latest, first and multikey need data made by "
                        f"`python data/prepare.py tasks` (config/tasks.toml) (default: passkey)")
    p.add_argument("--lengths", help="evaluation lengths, as eval_extrapolate.py takes them (default: 1x,4x,16x)")
    p.add_argument("--depths", default="0,0.5,1", help="needle depths of the retrieval tasks, as eval_extrapolate.py "
                                                        "takes them (default: 0,0.5,1)")
    p.add_argument("--samples", type=flag_type(int, "[1, inf)"), default=4,
                   help="retrieval prompts per (length, depth) and seed; loss windows per length and seed (default: 4)")
    p.add_argument("--curve", action="store_true",
                   help="learning curves: keep each run's checkpoint at every evaluation (the recipe's eval_interval, "
                        "or a tenth of --steps) and score each on the retrieval tasks at the first length; prints "
                        f"the steps to reach accuracy {LEARNED} per task. Such runs are their own, trained anew")
    p.add_argument("--quick", action="store_true", help="the SSMax question in a few minutes: nope and bam, SSMax on "
                                                        "and off, seed 1337, lengths 1x,4x (other flags still apply)")
    p.add_argument("--out-dir", default="out/compare", help="runs, results and plots (default: out/compare)")
    args = p.parse_args(argv)
    if args.curve and not set(args.tasks) & set(RETRIEVAL):
        p.error("--curve scores the retrieval tasks: give one in --tasks (e.g. --tasks passkey,latest)")
    for name, value in (QUICK if args.quick else GRID).items():  # flags given explicitly win
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# -----------------------------------------------------------------------------
# the grid: one run per (variant, ssmax, seed)


def plan_runs(args):
    """Every run of the grid: its name, train.py arguments and folder. The folder's name ends in a
    hash of every setting train.py resolves (the config file's included), so a changed recipe
    never reuses an old run."""
    runs = []
    for variant in args.variants:
        for ssmax in args.ssmax:
            for seed in args.seeds:
                argv = ["--config", args.config, *VARIANT_FLAGS[variant], *SSMAX_FLAGS[ssmax], "--seed", str(seed)]
                if args.data is not None:
                    argv += ["--data", args.data]
                if args.steps is not None:
                    evaluations = 10 if args.curve else 3  # a curve gets more points
                    argv += ["--max-steps", str(args.steps), "--eval-interval", str(max(1, args.steps // evaluations))]
                if args.block_size is not None:
                    argv += ["--block-size", str(args.block_size)]
                if args.qk_norm is not None:
                    argv += ["--qk-norm" if args.qk_norm else "--no-qk-norm"]
                if args.curve:
                    argv += ["--keep-checkpoints"]
                config, given = train.parse_config(argv)
                settings = {k: v for k, v in asdict(config).items() if k not in ("out_dir", "resume")} | given
                digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
                folder = os.path.join(args.out_dir, "runs", f"{variant}-ssmax_{ssmax}-seed{seed}-{digest}")
                runs.append({"name": f"{variant} ssmax {ssmax} seed {seed}", "variant": variant, "ssmax": ssmax,
                             "seed": seed, "folder": folder, "argv": argv + ["--out-dir", folder],
                             "settings": settings})
    return runs


def check_data(args, lengths):
    """Before any training: the data is there, the shortest prompt of each retrieval task fits and
    its words are in the data's vocabulary, and the val split holds the longest loss window."""
    meta = read_meta(args.data)
    for task in set(args.tasks) & set(RETRIEVAL):
        defaults = eval_extrapolate.parse_args(["--ckpt", "-", "--task", task])  # the evaluation's digits and needles
        task_sample(tokenizer_from_meta(meta), task, min(n for _, n in lengths), 0.0, defaults, None, random.Random(0))
    if "loss" in args.tasks:
        eval_extrapolate.val_split(args.data, meta["tokenizer"], max(n for _, n in lengths))


def trained_step(run):
    """The step of the run's last.pt (0 when there is none)."""
    path = os.path.join(run["folder"], "last.pt")
    if not os.path.exists(path):
        return 0
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def train_run(run):
    """Train (or finish) one run. A stop inside train.py saves its step and exits 130 or 143."""
    done = trained_step(run)
    if done >= run["settings"]["max_steps"]:
        return False
    try:
        train.main(run["argv"] + (["--resume"] if done else []))
    except SystemExit as e:
        if e.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise KeyboardInterrupt(e.code) from None
        raise
    return True


def snapshots(run):
    """[(step, file name)] of the checkpoints --keep-checkpoints kept, in step order."""
    names = [f for f in os.listdir(run["folder"]) if re.fullmatch(r"step_\d+\.pt", f)]
    return sorted((int(f[5:-3]), f) for f in names)


def result_path(run, task, label, n, args, ckpt="last.pt"):
    key = json.dumps([task, n, args.depths, args.samples] if task in RETRIEVAL else [task, n, args.samples])
    at = "" if ckpt == "last.pt" else ckpt.removesuffix(".pt") + "_"
    return os.path.join(run["folder"], "eval", f"{task}_{label}_{at}{hashlib.sha1(key.encode()).hexdigest()[:8]}.json")


def evaluate_run(run, task, label, n, args, ckpt="last.pt"):
    """One (run, task, length) result of the run's checkpoint `ckpt`: {"value": accuracy or loss,
    "count": prompts or windows}, from its file when it exists, else measured and written (atomically)."""
    path = result_path(run, task, label, n, args, ckpt)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), False
    argv = ["--ckpt", os.path.join(run["folder"], ckpt), "--task", task, "--lengths", str(n),
            "--samples", str(args.samples), "--seed", str(run["seed"])]
    if task in RETRIEVAL:
        argv += ["--depths", args.depths]
    evaluation = eval_extrapolate.evaluate(eval_extrapolate.parse_args(argv))
    if task in RETRIEVAL:
        hits = [r["correct"] for r in evaluation["results"]]
        result = {"value": sum(hits) / len(hits), "count": len(hits)}
    else:
        result = {"value": evaluation["summary"][0]["loss"], "count": len(evaluation["results"])}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_json(result | {"settings": evaluation["settings"]}, path)
    return result, True

# -----------------------------------------------------------------------------
# summary: mean and spread over seeds, tables and plots


def learned_at(curve):
    """The first step whose accuracy reaches LEARNED, or None."""
    return next((step for step, accuracy in curve if accuracy >= LEARNED), None)


def print_curves(curves, runs, args):
    """Per configuration and task: the step at which each seed learned it, '>N' where it did not."""
    tasks = [t for t in args.tasks if t in RETRIEVAL]
    print(f"\nsteps to learn each task at {args.curve_length} (accuracy >= {LEARNED}; one entry per seed)")
    print("variant".ljust(10) + "ssmax".ljust(7) + "".join(t.rjust(18) for t in tasks))
    for variant in args.variants:
        for ssmax in args.ssmax:
            mine = [r for r in runs if r["variant"] == variant and r["ssmax"] == ssmax]
            cells = [", ".join(str(learned_at(curves[(r["folder"], t)]) or f">{args.steps}") for r in mine) for t in tasks]
            print(variant.ljust(10) + ssmax.ljust(7) + "".join(c.rjust(18) for c in cells))


def summarize(runs, results, lengths, args):
    """{task: [{variant, ssmax, length label: {mean, min, max, count, seeds}}]} over the grid."""
    summary = {}
    for task in args.tasks:
        rows = []
        for variant in args.variants:
            for ssmax in args.ssmax:
                row = {"variant": variant, "ssmax": ssmax}
                mine = [r for r in runs if r["variant"] == variant and r["ssmax"] == ssmax]
                for label, _ in lengths:
                    values = [results[(r["folder"], task, label)] for r in mine]
                    row[label] = {"mean": statistics.fmean(v["value"] for v in values),
                                  "min": min(v["value"] for v in values), "max": max(v["value"] for v in values),
                                  "count": sum(v["count"] for v in values), "seeds": len(values)}
                if task in RETRIEVAL:
                    row["breaks_at"] = next((label for label, _ in lengths if row[label]["mean"] < BROKEN), None)
                rows.append(row)
        summary[task] = rows
    return summary


def print_table(task, rows, lengths):
    what = f"{task} accuracy (whole key right)" if task in RETRIEVAL else "validation loss (nats per scored token)"
    counted = "prompts" if task in RETRIEVAL else "windows"
    first = rows[0][lengths[0][0]]
    spread = " [min-max]" if first["seeds"] > 1 else ""
    print(f"\n{what}: mean over {first['seeds']} seed(s){spread}, {first['count']} {counted} per cell")
    breaks = f"breaks at (< {BROKEN})" if task in RETRIEVAL else ""
    print("variant".ljust(10) + "ssmax".ljust(7) + "".join(f"{label} ({n})".rjust(22) for label, n in lengths)
          + breaks.rjust(20))
    digits = 2 if task in RETRIEVAL else 3
    for row in rows:
        cells = [row[label] for label, _ in lengths]
        text = [f"{c['mean']:.{digits}f}" + (f" [{c['min']:.{digits}f}-{c['max']:.{digits}f}]" if c["seeds"] > 1 else "")
                for c in cells]
        broke = (row["breaks_at"] or f"beyond {lengths[-1][0]}") if task in RETRIEVAL else ""
        print(row["variant"].ljust(10) + row["ssmax"].ljust(7) + "".join(t.rjust(22) for t in text) + broke.rjust(20))


def save_plot(task, rows, lengths, path, block_size):
    """Accuracy (or loss) against length, log x: one line per configuration, the band its seeds span."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{task} plot skipped: matplotlib is not installed")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [n for _, n in lengths]
    colors = dict(zip(VARIANT_FLAGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for row in rows:
        cells = [row[label] for label, _ in lengths]
        style = dict(color=colors[row["variant"]], linestyle="-" if row["ssmax"] == "on" else "--")
        ax.plot(x, [c["mean"] for c in cells], marker="o", label=f"{row['variant']}, ssmax {row['ssmax']}", **style)
        ax.fill_between(x, [c["min"] for c in cells], [c["max"] for c in cells], alpha=0.12, color=style["color"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{label}\n{n}" for label, n in lengths])
    ax.minorticks_off()
    seeds = rows[0][lengths[0][0]]["seeds"]
    ax.set_title(f"mean over {seeds} seeds; band: their min to max" if seeds > 1 else "one seed")
    ax.set_xlabel(f"length in tokens (trained at {block_size})")
    ax.set_ylabel(f"{task} accuracy" if task in RETRIEVAL else "validation loss (nats)")
    if task in RETRIEVAL:
        ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="solid: SSMax on", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")

def save_curves(curves, runs, args, path):
    """One panel per task: accuracy at the first length against the training step, a line per
    configuration (the mean over seeds, at the steps every seed kept)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("curve plot skipped: matplotlib is not installed")
        return
    tasks = sorted({t for _, t in curves}, key=args.tasks.index)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False, sharey=True)
    colors = dict(zip(VARIANT_FLAGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, task in zip(axes[0], tasks):
        for variant in args.variants:
            for ssmax in args.ssmax:
                mine = [dict(curves[(r["folder"], task)]) for r in runs if r["variant"] == variant and r["ssmax"] == ssmax]
                steps = sorted(set.intersection(*(set(c) for c in mine)))
                ax.plot(steps, [statistics.fmean(c[s] for c in mine) for s in steps], marker=".", color=colors[variant],
                        linestyle="-" if ssmax == "on" else "--", label=f"{variant}, ssmax {ssmax}")
        ax.axhline(LEARNED, color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(task)
        ax.set_xlabel("training step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy at {args.curve_length}")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")

# -----------------------------------------------------------------------------


def stop_on_sigterm(signum, frame):
    """SIGTERM (a preempted job) stops the grid as Ctrl-C does; inside training, train.py's own
    handler saves the step first."""
    raise KeyboardInterrupt(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    runs = plan_runs(args)
    args.steps, args.block_size, args.data = (runs[0]["settings"][k] for k in ("max_steps", "block_size", "data"))
    try:
        lengths = eval_extrapolate.parse_lengths(args.lengths, args.block_size)
        eval_extrapolate.parse_depths(args.depths)
        check_data(args, lengths)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    curve_tasks = [t for t in args.tasks if t in RETRIEVAL] if args.curve else []
    args.curve_length = lengths[0][0]
    jobs = len(runs) * (1 + len(args.tasks) * len(lengths) + len(curve_tasks))
    print(f"grid: {len(args.variants)} variants x SSMax {','.join(args.ssmax)} x {len(args.seeds)} seed(s) = "
          f"{len(runs)} runs of {args.steps} steps, then {'+'.join(args.tasks)} at {args.lengths} -> {args.out_dir}")
    start, done, trained, measured, results, curves = time.time(), 0, 0, 0, {}, {}
    scored = 0  # results of checkpoints along the curves
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        for run in runs:
            done += 1
            print(f"[{done}/{jobs} {time.time() - start:.0f}s] {run['name']}: train", flush=True)
            trained += train_run(run)
            for task in args.tasks:
                for label, n in lengths:
                    done += 1
                    print(f"[{done}/{jobs} {time.time() - start:.0f}s] {run['name']}: {task} at {label}", flush=True)
                    results[(run["folder"], task, label)], new = evaluate_run(run, task, label, n, args)
                    measured += new
            for task in curve_tasks:
                done += 1
                print(f"[{done}/{jobs} {time.time() - start:.0f}s] {run['name']}: {task} at {lengths[0][0]}, "
                      f"every kept checkpoint", flush=True)
                curves[(run["folder"], task)] = []
                for step, ckpt in snapshots(run):
                    result, new = evaluate_run(run, task, *lengths[0], args, ckpt)
                    curves[(run["folder"], task)].append((step, result["value"]))
                    measured, scored = measured + new, scored + 1
    except KeyboardInterrupt as e:
        print(f"\nstopped after {done - 1} of {jobs} jobs; what finished is in {args.out_dir}/runs. Run the same "
              f"command to continue", file=sys.stderr)
        return e.args[0] if e.args else 128 + signal.SIGINT
    except (OSError, ValueError) as e:
        print(f"error: {run['name']}: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = summarize(runs, results, lengths, args)
    for task, rows in summary.items():
        print_table(task, rows, lengths)
    if curves:
        print_curves(curves, runs, args)
    save_json({"settings": vars(args), "lengths": lengths, "runs": runs, "summary": summary,
               "results": [{"folder": f, "task": t, "length": label, **v} for (f, t, label), v in results.items()],
               "curves": [{"folder": f, "task": t, "steps": c} for (f, t), c in curves.items()]},
              os.path.join(args.out_dir, "compare.json"))
    for task, rows in summary.items():
        save_plot(task, rows, lengths, os.path.join(args.out_dir, f"compare_{task}.png"), args.block_size)
    if curves:
        save_curves(curves, runs, args, os.path.join(args.out_dir, "compare_curve.png"))
    print(f"done in {time.time() - start:.0f}s: {trained} runs trained, {len(runs) - trained} reused; "
          f"{measured} results measured, {len(results) + scored - measured} reused -> {args.out_dir}/compare.json")
    return 0


if __name__ == "__main__":
    run_main(main)
