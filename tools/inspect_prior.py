"""
What a trained model's positional prior and SSMax learned.

    python tools/inspect_prior.py --ckpt out/bam/last.pt

Prints each head's BAM parameters with the paper's class of the head (BAM, arXiv 2505.22842:
local beta > 0, retrieval -0.6 <= beta <= 0, aggressive retrieval beta < -0.6), each layer's SSMax
scales s_h, and plots each head's log-prior b_h(t) against the distance t on a log axis (one panel
per layer when the prior is per layer) for any variant whose tables hold a "prior".
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from model import load_checkpoint
from common.settings import Parser, flag_type, output_file, run_main


def head_class(beta):
    """BAM's classes of heads by the shape parameter beta of their Generalized-Gaussian prior."""
    if beta > 0:
        return "local"
    return "retrieval" if beta >= -0.6 else "aggressive retrieval"


def describe(model):
    """{"priors": [per prior module: [per head: {...}]], "ssmax": [per layer: [s_h]]}."""
    priors = []
    for variant in model.positional:
        if hasattr(variant, "theta_beta"):  # BAM
            alpha, beta = variant.theta_alpha.exp().tolist(), variant.theta_beta.tolist()
            mu = (variant.theta_mu.exp() - (-variant.theta_mu).exp()).tolist()
            priors.append([{"head": h, "alpha": a, "beta": b, "mu": m, "class": head_class(b)}
                           for h, (a, b, m) in enumerate(zip(alpha, beta, mu))])
    ssmax = [block.attn.ssmax_scale.tolist() for block in model.blocks if hasattr(block.attn, "ssmax_scale")]
    return {"priors": priors, "ssmax": ssmax}


def print_description(info, config):
    shared = "one prior for all layers" if len(info["priors"]) == 1 else "one prior per layer"
    for i, heads in enumerate(info["priors"]):
        print(f"\nBAM prior {'(' + shared + ')' if len(info['priors']) == 1 else f'of layer {i}'}: "
              f"b_h(t) = -alpha (|t - mu| + 1e-5)^beta")
        print("head".ljust(6) + "alpha".rjust(10) + "beta".rjust(10) + "mu".rjust(8) + "  class")
        for head in heads:
            print(f"{head['head']:<6}{head['alpha']:>10.4g}{head['beta']:>10.3f}{head['mu']:>8.2f}  {head['class']}")
    if not info["priors"]:
        print(f"\n{config.attention}: no BAM parameters")
    if info["ssmax"]:
        print("\nSSMax scales s_h (logits times s_h log n), rows: layers, columns: heads")
        for i, scales in enumerate(info["ssmax"]):
            print(f"layer {i}".ljust(9) + "".join(f"{s:>8.3f}" for s in scales))
    else:
        print("\nno SSMax")


def save_plot(model, max_distance, path, title):
    """The penalty -b_h(t) for t = 1..max_distance on log-log axes, where BAM's alpha t^beta is a
    line of slope beta; one line per head, one panel per prior module."""
    tables = [variant(max_distance + 1, torch.device("cpu")).get("prior") for variant in model.positional]
    if tables[0] is None:
        print(f"plot skipped: {model.config.attention} has no additive prior table")
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return
    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables) + 1, 4), squeeze=False)
    t = torch.arange(1, max_distance + 1)
    for i, (ax, table) in enumerate(zip(axes[0], tables)):
        penalty = -table.detach()[:, 1:]
        betas = getattr(model.positional[i], "theta_beta", None)
        for h, row in enumerate(penalty):
            beta = "" if betas is None else f": beta {betas[h]:.2f}, {head_class(betas[h])}"
            ax.plot(t, row, label=f"head {h}{beta}")
        ax.set_xscale("log")
        ax.set_yscale("log" if bool((penalty > 0).all()) else "symlog")
        ax.set_xlabel("distance t (tokens)")
        ax.set_title("one prior, all layers" if len(tables) == 1 else f"layer {i}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("-b_h(t), the log-prior's penalty")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    p = Parser(prog="tools/inspect_prior.py", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--max-distance", type=flag_type(int, "[1, inf)"),
                   help="the plot's longest distance in tokens (default: 64 x the training length)")
    p.add_argument("--out", type=output_file, help="plot PNG (default: prior.png next to the checkpoint)")
    args = p.parse_args(argv)
    try:
        model, checkpoint = load_checkpoint(args.ckpt)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(f"{args.ckpt}: {c.attention}, ssmax {c.ssmax}, rope {c.rope}, {c.n_layer} layers x {c.n_head} heads, "
          f"trained at {c.block_size} tokens, step {checkpoint.get('step')}")
    with torch.no_grad():
        print_description(describe(model), c)
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "prior.png")
        save_plot(model, args.max_distance or 64 * c.block_size, out, f"{c.attention}: log-prior by head (BAM: slope = beta)")
    return 0


if __name__ == "__main__":
    run_main(main)
