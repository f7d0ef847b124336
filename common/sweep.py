"""
An evaluation sweep that survives a stop, and its reports.

eval_extrapolate.py scores cells, a (length, depth) pair of prompts, or one length of loss windows,
and writes its results file after each finished cell, atomically, marked "complete": false until
the last. --resume reads that file back and continues, keeping the finished cells, but only when
the checkpoint, the data and the haystack (by content: SHA-256) and every setting that can change
a result are those of the file.
"""
import hashlib
import json

# settings that say where things are or bound memory: they cannot change a result (the files that
# ckpt, data and haystack name are compared by their content_digest)
NOT_COMPARED = ("ckpt", "out", "max_memory_gb", "data", "haystack")


def content_digest(*paths):
    """SHA-256 of the files' contents, in order: a retrained checkpoint, a remade dataset or an edited
    haystack is another input, the same files moved or copied are not."""
    digests = []
    for path in paths:
        with open(path, "rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())
    return digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()


def finished_sweep(path, settings):
    """The results file of the stopped sweep at `path`, checked to be this run's: same checkpoint,
    task, seed and settings. Raises ValueError with one line naming the first difference."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--resume: there is no sweep to continue at {path}; run without --resume") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume: cannot read {path} ({e}); run without --resume to start over") from None
    old, new = saved.get("settings", {}), json.loads(json.dumps(settings))  # as JSON gives them back
    for key in sorted((set(old) | set(new)) - set(NOT_COMPARED)):
        if old.get(key) != new.get(key):
            what = {"ckpt_sha256": "the checkpoint's SHA-256", "data_sha256": "the SHA-256 of --data's val split",
                    "haystack_sha256": "the SHA-256 of --haystack"}.get(key, key)
            raise ValueError(f"cannot resume {path}: it was made with {what} = {old.get(key)!r}, this run has "
                             f"{new.get(key)!r}; give the same checkpoint and settings, or run without --resume "
                             f"to start over")
    return saved


def accuracy_grid(results, lengths, depths):
    """{depth or 'all': {length label: accuracy}}; niah counts every needle of a prompt."""
    def accuracy(n, depth):  # None for a cell not run (yet)
        hits = [r["correct"] for r in results if r["length"] == n and depth in ("all", r["depth"])]
        return sum(hits) / len(hits) if hits else None
    return {str(d): {label: accuracy(n, d) for label, n in lengths} for d in depths + ["all"]}


# what a row's depth is the depth of, per task
DEPTH_OF = {"niah": "depth of the first needle", "multikey": "depth of the asked needle",
            "latest": "depth of the last needle", "first": "depth of the last needle; the first is at 0"}


def print_grid(grid, lengths, name):
    rows = DEPTH_OF.get(name, "needle depth")
    print(f"\n{name} accuracy, rows: {rows}, columns: length")
    print("depth".ljust(8) + "".join(f"{f'{label} ({n})':>16}" for label, n in lengths))
    for depth, row in grid.items():
        print(depth.ljust(8) + "".join(f"{'-' if row[label] is None else f'{row[label]:.2f}':>16}" for label, _ in lengths))


def print_losses(summary, masked):
    """Loss table: one row per length, the mean and one column per position bucket."""
    names = list(max((s["buckets"] for s in summary), key=len))
    scored = "the tokens the dataset's loss mask counts (answers)" if masked else "all positions"
    print(f"\nvalidation loss on {scored}; columns: all of them, then by position bucket")
    print("length".ljust(18) + f"{'all':>8}" + "".join(f"{b:>16}" for b in names))
    for s in summary:
        cells = "".join(f"{s['buckets'][b]:>16.3f}" if b in s["buckets"] else " " * 16 for b in names)
        print(f"{s['label']} ({s['length']})".ljust(18) + f"{s['loss']:>8.3f}" + cells)


def save_heatmap(grid, lengths, depths, path, title, task):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("heatmap skipped: matplotlib is not installed")
        return
    grid = [[grid[str(d)][label] for label, _ in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{label}\n{n}" for label, n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel(DEPTH_OF.get(task, "needle depth"))
    ax.set_title(title)
    fig.colorbar(im, label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")
