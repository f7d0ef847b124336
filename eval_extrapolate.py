"""
Retrieval and loss far beyond the training length.

    python eval_extrapolate.py --ckpt out/ckpt.pt --task passkey --lengths 1x,4x,16x,64x --depths 0,0.5,1
    python eval_extrapolate.py --ckpt out/ckpt.pt --task niah --lengths 1x,16x --haystack book.txt
    python eval_extrapolate.py --ckpt out/tasks/ckpt.pt --task latest --lengths 1x,4x,16x
    python eval_extrapolate.py --ckpt out/ckpt.pt --task loss --lengths 1x,4x,16x --data data/synthetic

passkey   the Mohtashami & Jaggi prompt as BAM evaluates it (docs/findings.md, "Retrieval"), one needle
niah      several "special magic <city> number" needles, each asked about at the end (scale-invariant paper)
latest    --needles "The pass key is <key>." with different keys, the last at the depth, the first at 0,
          the others evenly between; asks for the latest key
first     the same prompts; asks for the first key
multikey  --needles city needles placed as niah places them; asks for the number of the one at the depth
loss      validation loss at each length, overall and per position bucket

latest and first need a model trained on their data (python data/prepare.py tasks), as multikey
does to be answered well (its words are niah's).

Lengths are multiples of the training length ("4x") or token counts ("8192"). Retrieval is
scored teacher-forced, with logits only at the answer positions: no T x vocab tensor is built.
"""
import glob
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from attention import ENGINES, document_ids
from common.checkpoint import save_json
from model import load_checkpoint
from common.settings import Parser, StopSignals, autocast, flag_type, output_file, pick_device, pick_dtype, run_main
from common.sweep import accuracy_grid, content_digest, finished_sweep, print_grid, print_losses, save_heatmap
from data.retrieval import answer_logits, judge, task_sample
from data.shards import LOSS_MASK_DIR, load_tokens, read_header, read_meta, tokenizer_from_meta
from data.synthetic import CITIES
from engines.memory import check_memory

RETRIEVAL_TASKS = ("passkey", "niah", "latest", "first", "multikey")

# -----------------------------------------------------------------------------
# the loss by position


def position_losses(model, tokens, chunk=4096, eot=None):
    """Cross-entropy of each next-token prediction in a window of L+1 tokens, (L,). Logits are
    made from the hidden states `chunk` positions at a time, never L x vocab at once. With `eot`
    (a model trained with --doc-mask), attention stays inside each document, as in training."""
    x, y = tokens[None, :-1], tokens[1:]
    h = model.hidden_states(x, doc=None if eot is None else document_ids(x, eot))[0]
    return torch.cat([F.cross_entropy(model.lm_head(h[s:s + chunk]).float(), y[s:s + chunk], reduction="none")
                      for s in range(0, len(y), chunk)])


def buckets(length, block_size):
    """Position buckets [0,1x), [1x,2x), [2x,4x), ... in multiples of the training length, the
    last one cut at `length`: (name, start, end)."""
    edges = [0, 1]
    while edges[-1] * block_size < length:
        edges.append(2 * edges[-1])
    return [(f"[{a}x,{b}x)".replace("[0x", "[0"), a * block_size, min(b * block_size, length))
            for a, b in zip(edges[:-1], edges[1:]) if a * block_size < length]


def val_split(folder, tokenizer, longest):
    """The val shards of a prepared dataset and their sizes, checked: made with the checkpoint's
    tokenizer and holding a window of longest + 1 tokens."""
    if folder is None:
        raise ValueError("the checkpoint does not record its training data: give --data FOLDER")
    meta = read_meta(folder)
    if meta.get("tokenizer") != tokenizer:
        raise ValueError(f"{folder} was tokenized with {meta.get('tokenizer')!r}, the checkpoint with {tokenizer!r}")
    files = sorted(glob.glob(os.path.join(folder, "val_*.bin")))
    if not files:
        raise ValueError(f"no val_*.bin shards in {folder}")
    sizes = [read_header(f) for f in files]
    if sum(sizes) < longest + 1:
        raise ValueError(f"the val split of {folder} has {sum(sizes)} tokens; length {longest} needs {longest + 1}")
    return files, sizes


def read_window(files, sizes, start, n):
    """n tokens from `start` in the concatenation of the shards, as int64 (maps only what it reads)."""
    parts = []
    for f, size in zip(files, sizes):
        if start < size and n > 0:
            part = np.array(load_tokens(f)[start:start + n], dtype=np.int64)
            parts.append(part)
            n -= len(part)
        start = max(0, start - size)
    return torch.from_numpy(np.concatenate(parts))

# -----------------------------------------------------------------------------
# command line


def parse_lengths(text, block_size):
    """'1x,4x,8192' -> [('1x', 384), ('4x', 1536), ('8192', 8192)] for a training length of 384."""
    lengths = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(item[:-1]) * block_size if item.endswith("x") else int(item)
        except ValueError:
            value = None
        if value is None or not value > 0 or abs(value - round(value)) > 1e-6:
            raise ValueError(f"bad length {item!r}: give a positive token count (8192) or a multiple of the "
                             f"training length {block_size} that is a whole number of tokens (4x)")
        lengths.append((item, round(value)))
    return lengths


def parse_depths(text):
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; 'even:N' -> N depths evenly spaced from 0 to 1."""
    if text.startswith("even:"):
        n = text[5:]
        if not n.isdigit() or int(n) < 2:
            raise ValueError(f"bad --depths {text!r}: even:N needs a whole number N >= 2, e.g. even:10")
        return [i / (int(n) - 1) for i in range(int(n))]
    try:
        depths = [float(d) for d in text.split(",")]
    except ValueError:
        raise ValueError(f"bad --depths {text!r}: give comma-separated fractions in [0, 1], or even:N") from None
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise ValueError(f"depth {bad[0]} is outside [0, 1] (0 = farthest from the question, 1 = just before it)")
    return depths


def parse_args(argv):
    p = Parser(prog="eval_extrapolate.py", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--task", choices=RETRIEVAL_TASKS + ("loss",), default="passkey",
                   help="passkey retrieval, needle in a haystack, the latest or the first of several keys, one "
                        "labelled key among distractors (multikey), or validation loss (default: passkey)")
    p.add_argument("--lengths", default="1x,4x,16x,64x",
                   help="comma-separated total lengths: multiples of the training length (4x) or token "
                        "counts (8192) (default: 1x,4x,16x,64x)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="needle depths in [0, 1]: 0 = right after the prefix (farthest from the question), "
                        "1 = just before the question; niah and multikey: of the first needle, latest and first: of "
                        "the last one; even:N = N depths evenly spaced (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=flag_type(int, "[1, inf)"), default=5,
                   help="samples per (length, depth) cell; for loss, windows per length (default: 5)")
    p.add_argument("--seed", type=flag_type(int, "[0, inf)"), default=1337, help="random seed of keys, cities and windows (default: 1337)")
    p.add_argument("--digits", type=flag_type(int, "[1, inf)"), default=5,
                   help="digits of the keys of passkey, latest, first and multikey (default: 5)")
    p.add_argument("--prefix-digits", type=flag_type(int, "[0, inf)"), default=0,
                   help="passkey: the question gives the key's first N digits and only the rest is scored (default: 0)")
    p.add_argument("--patience", type=flag_type(int, "[0, inf)"), default=0,
                   help="stop the sweep after N lengths in a row at 0 accuracy; the longer ones are skipped "
                        "(0: never; default: 0)")
    p.add_argument("--needles", type=flag_type(int, f"[1, {len(CITIES)}]"), default=3,
                   help="niah, latest, first, multikey: needles per prompt, at most 9 for the last three (their "
                        "keys differ in the first digit) (default: 3)")
    p.add_argument("--haystack", help="niah, latest, first, multikey: a text file to cut the haystack from "
                                      "(default: the passkey filler)")
    p.add_argument("--data", help="loss: a prepared dataset folder with val_*.bin and meta.json "
                                  "(default: the checkpoint's training data)")
    p.add_argument("--loss-chunk", type=flag_type(int, "[1, inf)"), default=4096, help="loss: positions per lm_head call (default: 4096)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="autocast dtype (default: bfloat16 on CUDA, float16 where bf16 is unsupported, "
                        "float32 elsewhere)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="attention engine; auto = sdpa for plain NoPE (no SSMax, no documents; off CUDA only where "
                        "every position is a query), else flex on CUDA and the chunked engine's inference tiles "
                        "elsewhere (default: auto)")
    p.add_argument("--attn-block", type=flag_type(int, "[1, inf)"), default=512,
                   help="query tile of the chunked engine; memory ~ 5 x heads x block x length bytes (default: 512)")
    p.add_argument("--max-memory-gb", type=flag_type(float, "(0, inf)"),
                   help="memory budget for the pre-run check (default: the device's free memory)")
    p.add_argument("--out", type=output_file, help="results JSON (default: eval_<task>_<checkpoint name>.json next to "
                                 "the checkpoint, e.g. eval_passkey_best.json; a heatmap .png goes next to it when "
                                 "matplotlib is installed); written after every finished (length, depth) cell")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep stopped in --out (SIGTERM, Ctrl-C, a crash), keeping its finished cells; "
                        "refused unless the checkpoint, --data and --haystack (by content) and every other setting "
                        "are the same")
    args = p.parse_args(argv)
    ckpt_name = os.path.splitext(os.path.basename(args.ckpt))[0]  # best.pt and last.pt of a run: two files
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                        f"eval_{args.task}_{ckpt_name}.json")
    if args.task in ("latest", "first", "multikey") and not 2 <= args.needles <= 9:
        p.error(f"--task {args.task} needs --needles 2 to 9: with one needle there is nothing to tell apart, and "
                f"the keys of more than 9 cannot all differ in their first digit")
    if args.prefix_digits >= args.digits:
        p.error(f"--prefix-digits must be from 0 to {args.digits - 1} (--digits {args.digits} leaves at least one to answer)")
    return args

# -----------------------------------------------------------------------------


def build_cells(model, enc, lengths, depths, args):
    """Every prompt of the run, {(label, length): {depth: [samples]}}: built before any compute, so
    a length too short or a tokenizer that does not fit the model fails at once."""
    haystack = None
    if args.haystack:
        try:
            with open(args.haystack, encoding="utf-8", errors="replace") as f:
                haystack = np.array(enc.encode_ordinary(f.read()), dtype=np.int64)
        except OSError as e:
            raise ValueError(f"cannot read --haystack {args.haystack}: {e.strerror or e}") from None
    cells = {}
    for label, n in lengths:
        for depth in depths:
            for i in range(args.samples):
                rng = random.Random(f"{args.seed}/{n}/{depth}/{i}")
                cells.setdefault((label, n), {}).setdefault(depth, []).append(
                    task_sample(enc, args.task, n, depth, args, haystack, rng))
    if max(int(s["tokens"].max()) for by_depth in cells.values() for samples in by_depth.values()
           for s in samples) >= model.config.vocab_size:
        raise ValueError(f"the tokenizer gives ids >= the model's vocab_size {model.config.vocab_size}")
    return cells


def score_cells(model, enc, cells, device, ctx, patience=0, done=(), saved=None, stop=None):
    """Score every prompt cell by cell, shortest length first. done: result rows of cells finished
    by an earlier run (--resume), kept and not recomputed; saved(results) after each finished cell;
    stop.signum set: return at the next prompt, without the unfinished cell. With patience, stop
    after that many lengths in a row where nothing was retrieved. Returns (results, stopped)."""
    results, misses = [], 0
    for (label, n), by_depth in cells.items():
        if patience and misses >= patience:
            print(f"{label}: skipped (--patience {patience}: {misses} lengths in a row at 0 accuracy)")
            continue
        scored = len(results)
        with tqdm(total=sum(map(len, by_depth.values())), desc=f"{label} ({n} tokens)", unit="prompt") as bar:
            for depth, samples in by_depth.items():
                finished = [r for r in done if r["length"] == n and r["depth"] == depth]
                if finished:
                    results += finished
                    bar.update(len(samples))
                    continue
                cell = []
                for sample in samples:
                    if stop is not None and stop.signum:
                        return results, True
                    start = time.time()
                    with ctx:
                        logits = answer_logits(model, sample, device)
                    for k, verdict in enumerate(judge(logits, sample, enc)):
                        at = sample["needle_depths"][k] if "needle_depths" in sample else sample["depth"]
                        cell.append({"length": n, "label": label, "actual_length": len(sample["tokens"]) - 1,
                                     "depth": sample["depth"], "needle": k, "needle_depth": at,
                                     "needle_at": sample["needle_at"][k], "key": sample["keys"][k],
                                     "needles_at": sample.get("all_needles_at", sample["needle_at"]),
                                     **verdict, "seconds": time.time() - start})
                    bar.update()
                results += cell
                if saved is not None:
                    saved(results)
        misses = 0 if any(r["correct"] for r in results[scored:]) else misses + 1
    return results, False


def score_losses(model, lengths, files, sizes, args, device, ctx, done=None, saved=None, stop=None):
    """Per length: `samples` windows of L+1 tokens evenly spaced through the val split. Returns
    every window's mean loss and, per length, the mean loss overall and per position bucket.
    Where the dataset has loss masks (data/synthetic), only the tokens they count are scored.
    done, saved, stop: as score_cells takes them, a cell being one length. Returns (results,
    summary, stopped)."""
    masks = [os.path.join(os.path.dirname(f), LOSS_MASK_DIR, os.path.basename(f)) for f in files]
    masks = masks if all(os.path.exists(m) for m in masks) else None
    results, summary = [], []
    for label, n in lengths:
        finished = [s for s in (done or {}).get("summary", []) if s["length"] == n]
        if finished:
            results += [r for r in done["results"] if r["length"] == n]
            summary += finished
            continue
        starts = np.linspace(0, sum(sizes) - n - 1, args.samples).round().astype(int).tolist()
        total, counted, cell = torch.zeros(n), torch.zeros(n), []
        for start in tqdm(starts, desc=f"{label} ({n} tokens)", unit="sample"):
            if stop is not None and stop.signum:
                return results, summary, True
            t0 = time.time()
            with ctx:
                window = read_window(files, sizes, start, n + 1).to(device)
                losses = position_losses(model, window, args.loss_chunk, args.doc_eot).cpu()
            weight = torch.ones(n) if masks is None else read_window(masks, sizes, start + 1, n).float()
            total += losses * weight
            counted += weight
            cell.append({"length": n, "label": label, "start": start, "seconds": time.time() - t0, "masked": masks is not None,
                         "loss": ((losses * weight).sum() / weight.sum().clamp(min=1)).item()})
        results += cell
        summary.append({"length": n, "label": label, "loss": (total.sum() / counted.sum().clamp(min=1)).item(),
                        "buckets": {name: (total[a:b].sum() / counted[a:b].sum().clamp(min=1)).item()
                                    for name, a, b in buckets(n, model.config.block_size)}})
        if saved is not None:
            saved(results, summary)
    return results, summary, False


def evaluate(args, save=None, stop=None):
    """Run one evaluation: {"settings", "complete", "summary", "results"}, plus "lengths" and
    "depths" for the reports; prints one line naming the checkpoint, then progress bars. save:
    called with the evaluation so far ("complete": false) after each finished cell; stop: see
    score_cells. With args.resume, the finished cells of args.out are kept. Raises ValueError or
    OSError, with a one-line message, for what the user can fix."""
    device = pick_device(args.device)
    args.device = str(device)  # recorded in the results
    model, checkpoint = load_checkpoint(args.ckpt, device)
    block_size = checkpoint["model_config"]["block_size"]
    lengths = parse_lengths(args.lengths, block_size)
    depths = parse_depths(args.depths)
    enc = tokenizer_from_meta(checkpoint["meta"])
    model.eval()
    model.config.engine, model.config.attn_block = args.engine, args.attn_block
    inputs = {"ckpt_sha256": content_digest(args.ckpt)}  # what a resumed sweep must read again
    if args.task == "loss":
        folder = args.data or checkpoint.get("train_config", {}).get("data")
        files, sizes = val_split(folder, checkpoint["meta"]["tokenizer"], max(n for _, n in lengths))
        doc_mask = checkpoint.get("train_config", {}).get("doc_mask", False)
        args.doc_eot = checkpoint["meta"]["eot_token"] if doc_mask else None
        masks = [m for m in (os.path.join(folder, LOSS_MASK_DIR, os.path.basename(f)) for f in files) if os.path.exists(m)]
        inputs["data_sha256"] = content_digest(os.path.join(folder, "meta.json"), *files, *masks)
    else:
        cells = build_cells(model, enc, lengths, depths, args)
        if args.haystack:
            inputs["haystack_sha256"] = content_digest(args.haystack)
    check_memory(model, lengths, args, device)
    torch_dtype = pick_dtype(args.dtype, device)
    ctx, dtype = autocast(device, torch_dtype), str(torch_dtype).removeprefix("torch.")
    settings = dict({k: v for k, v in vars(args).items() if k != "resume"}, dtype=dtype, block_size=block_size,
                    attention=model.config.attention, step=checkpoint.get("step"), lengths=lengths, **inputs)
    done = finished_sweep(args.out, settings) if args.resume else None

    def evaluation(results, summary, complete):
        scored = [(label, n) for label, n in lengths if any(r["length"] == n for r in results)]
        if args.task != "loss":
            summary = accuracy_grid(results, scored, depths)
        return {"settings": settings, "complete": complete, "summary": summary, "results": results,
                "lengths": scored, "depths": depths}

    def save_partial(results, summary=None):
        if save is not None:
            save(evaluation(results, summary, False))

    print(f"{args.ckpt}: {model.config.attention}, trained at {block_size} tokens, step {checkpoint.get('step')}; "
          f"{device}, {dtype}, engine {args.engine}, attn block {args.attn_block}"
          + (f"; resuming {args.out}" if done else ""), flush=True)
    with torch.no_grad():
        if args.task == "loss":
            results, summary, stopped = score_losses(model, lengths, files, sizes, args, device, ctx, done,
                                                     save_partial, stop)
        else:
            results, stopped = score_cells(model, enc, cells, device, ctx, args.patience,
                                           done["results"] if done else (), save_partial, stop)
            summary = None
    return evaluation(results, summary, not stopped)


def main(argv=None):
    args = parse_args(argv)
    out = args.out

    def save(evaluation):
        save_json({k: evaluation[k] for k in ("settings", "complete", "summary", "results")}, out)

    with StopSignals("after this prompt; its unfinished cell is dropped",
                     f"the finished cells are in {out}") as stop:
        try:
            evaluation = evaluate(args, save, stop)
        except (OSError, ValueError) as e:  # expected failures: one line, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
    settings, summary, results, lengths = (evaluation[k] for k in ("settings", "summary", "results", "lengths"))
    if args.task == "loss":
        if summary:
            print_losses(summary, any(r["masked"] for r in results))
    else:
        print_grid(summary, lengths, args.task)
    try:
        save(evaluation)
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}; the results are above", file=sys.stderr)
        return 2
    if not evaluation["complete"]:
        print(f"stopped by {signal.Signals(stop.signum).name}: the finished cells are in {out}; continue with "
              f"the same command and --resume")
        return 128 + stop.signum
    if args.task != "loss":
        save_heatmap(summary, lengths, evaluation["depths"], os.path.splitext(out)[0] + ".png",
                     f"{args.task}: {settings['attention']}, trained at {settings['block_size']} tokens", args.task)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
