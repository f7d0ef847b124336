"""
Train a GPT on one device, or on several with torchrun. Every setting is a flag (python train.py
--help); a recipe, a JSON or TOML file of settings (config/*.toml), sets them too, and flags win over it.
A recipe's table named after a variant ([scaleinv]) holds the settings of that variant only.

    python data/prepare.py synthetic && python train.py --config config/main.toml   # the main job: CPU, minutes
    python train.py --config config/gpt2_124m.toml                                  # GPT-2 124M on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --config config/gpt2_124m.toml --grad-accum 4  # on 8 GPUs

Under torchrun a step reads nproc x --grad-accum micro-batches of --batch-size sequences, the same
ones a single process reads with --grad-accum nproc x grad_accum, and gives the same gradient.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from attention import VARIANTS, document_ids
from common.checkpoint import RUNTIME_FIELDS, THIS_MACHINE, make_checkpoint, restore, resume_changes, save_checkpoint
from common.distributed import check_world, start_world
from common.settings import (Parser, StopSignals, autocast, check_fields, fail, flag_type, gpu_peak, param,
                             pick_dtype, read_recipe, value_type)
from data.shards import TokenLoader, data_fingerprint, read_meta
from model import GPT, GPTConfig, load_checkpoint


@dataclass
class TrainConfig:
    data: str = param("data/synthetic", "prepared data folder (train_*.bin, val_*.bin, meta.json)")
    out_dir: str = param("out", "folder for checkpoints (last.pt, best.pt) and log.jsonl")
    resume: bool = param(False, "continue from out_dir/last.pt exactly where it stopped, with its settings; a flag "
                         "given again with another value is applied and said, or refused (docs/resume.md)")
    device: str = param("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = param("auto", "auto | float32 | bfloat16 (auto: bfloat16 on CUDA where supported)",
                       choices=("auto", "float32", "bfloat16"))
    compile: bool | None = param(None, "torch.compile the model (default: on for CUDA)")
    seed: int = param(1337, "random seed", "[0, inf)")
    batch_size: int = param(16, "sequences per micro-batch", "[1, inf)")
    grad_accum: int = param(1, "micro-batches per optimizer step (per process under torchrun); together they give the "
                            "gradient of one batch of all of them", "[1, inf)")
    max_steps: int = param(300, "optimizer steps to train for", "[1, inf)")
    lr: float = param(3e-3, "peak learning rate", "(0, inf)")
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of --lr", "[0, 1]")
    warmup_steps: int = param(20, "linear warmup steps", "[0, inf)")
    lr_decay_steps: int | None = param(None, "steps of the cosine decay (default: max_steps)", "[1, inf)")
    weight_decay: float = param(0.1, "AdamW weight decay (weight matrices only)", "[0, inf)")
    prior_lr_scale: float = param(1.0, "learning rate of the positional prior's parameters (bam's alpha and beta) as a "
                                  "multiple of --lr, following its schedule", "(0, inf)")
    decay_embeddings: bool = param(True, "apply weight decay to the (tied) embedding too")
    beta1: float = param(0.9, "AdamW beta1", "[0, 1)")
    beta2: float = param(0.95, "AdamW beta2", "[0, 1)")
    grad_clip: float = param(1.0, "clip the gradient norm to this (0: off)", "[0, inf)")
    doc_mask: bool = param(False, "document masking: attention and SSMax counts stay inside a document")
    eval_interval: int = param(50, "evaluate and checkpoint every this many steps", "[1, inf)")
    eval_batches: int = param(8, "validation batches per evaluation", "[1, inf)")
    keep_checkpoints: bool = param(False, "also keep each evaluation's checkpoint as step_<N>.pt, for learning curves "
                                   "(tools/compare.py --curve)")
    log_interval: int = param(10, "write a log.jsonl line (loss, gradient norm, lr, tokens/s) every this many steps",
                              "[1, inf)")

    def __post_init__(self):
        check_fields(self)


MODEL_FLAGS = [f for f in fields(GPTConfig) if f.name != "vocab_size"]  # vocab comes from the data
SETTINGS = {f.name: f for f in fields(TrainConfig) + tuple(MODEL_FLAGS)}
MODEL_NAMES = {f.name for f in MODEL_FLAGS}
TRAIN_NAMES = {f.name for f in fields(TrainConfig)}


# ----------------------------------------------------------------------------------------
# configuration: dataclass fields -> flags; config file; validation

def build_parser():
    parser = Parser(prog="train.py", description=__doc__, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="JSON or TOML file of settings (keys as the flags, with _ for -); a table "
                        "named after a variant ([scaleinv]) holds settings for that variant only")
    for group_name, config_fields in (("training", fields(TrainConfig)), ("model", MODEL_FLAGS)):
        group = parser.add_argument_group(group_name)
        for f in config_fields:
            flag = "--" + f.name.replace("_", "-")
            help = f"{f.metadata['help']} (default: {f.default})"
            if value_type(f.type) is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
            else:
                group.add_argument(flag, type=flag_type(f.type, f.metadata["interval"]), choices=f.metadata["choices"],
                                   help=help)
    return parser


def parse_config(argv):
    """Returns (TrainConfig, the settings given explicitly by the file or the flags). The recipe's
    table for the variant trained wins over its other settings, and flags win over both."""
    args = vars(build_parser().parse_args(argv))
    values, tables = read_recipe(args.pop("config"), SETTINGS, VARIANTS) if "config" in args else ({}, {})
    values.update(tables.get(args.get("attention", values.get("attention", SETTINGS["attention"].default)), {}))
    values.update(args)
    try:
        config = TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_NAMES})
        GPTConfig(**{k: v for k, v in values.items() if k in MODEL_NAMES})  # validate before anything runs
    except ValueError as e:  # the settings that only fit together (n_embd and n_head)
        fail(f"{e}; see python train.py --help")
    return config, values


# ----------------------------------------------------------------------------------------
# device, schedule, evaluation

def learning_rate(step, config):
    """Linear warmup, then cosine decay to min_lr_ratio * lr over lr_decay_steps."""
    decay_steps = config.lr_decay_steps or config.max_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def peak_flops(device):
    """bf16 dense peak of a known GPU in FLOP/s, for MFU; None when unknown."""
    tflops = gpu_peak(torch.cuda.get_device_name(device))[1] if device.startswith("cuda") else None
    return tflops and tflops * 1e12


@torch.no_grad()
def evaluate(model, loader, batches, world, mixed, eot, doc_mask):
    """The mean loss of the first `batches` validation batches, on every rank: rank r scores
    batches r, r + W, r + 2W, ... of them, and the sum goes round."""
    model.eval()
    loader.reset()
    total = 0.0
    for i in range(batches):
        if i % world.size != world.rank:
            loader.skip()
            continue
        x, y = (torch.from_numpy(a).to(world.device) for a in loader.next_batch())
        with mixed:
            _, loss = model(x, y, doc=document_ids(x, eot) if doc_mask else None)
        total += loss.item()
    model.train()
    return world.sum(total) / batches


def read_step_share(loader, world, grad_accum):
    """This rank's micro-batches of a step. Every rank walks the step's W x grad_accum batches, the
    ones a single process reads with --grad-accum W x grad_accum, and rank r takes the r-th run of
    grad_accum of them; so the data order, and the loader state, do not depend on W."""
    share = []
    for i in range(world.size * grad_accum):
        if i // grad_accum == world.rank:
            share.append(loader.next_batch())
        else:
            loader.skip()
    return share


# ----------------------------------------------------------------------------------------
# checkpoints and resume

def resume_run(config, given, world):
    """(config, model, checkpoint, changes) of a run resumed from out_dir/last.pt: the checkpoint's
    settings, this command's THIS_MACHINE ones, and those given again where a resume may change them
    (checkpoint.resume_changes: changes, {name: (saved, given)}); any other change stops it, in one line."""
    path = os.path.join(config.out_dir, "last.pt")
    try:
        model, checkpoint = load_checkpoint(path, world.device, {k: v for k, v in given.items() if k in RUNTIME_FIELDS})
        changes = resume_changes(checkpoint, given, path)
    except (FileNotFoundError, ValueError) as e:
        fail(f"cannot resume: {e}")
    saved = {k: v for k, v in checkpoint["train_config"].items() if k in TRAIN_NAMES}
    config = TrainConfig(**saved | {k: getattr(config, k) for k in ("out_dir", "resume", *THIS_MACHINE)}
                         | {k: v for k, v in given.items() if k in TRAIN_NAMES})
    check_world(checkpoint, config, world, path)
    if config.data != saved["data"]:  # the same data in another folder, or not
        try:
            same = data_fingerprint(config.data) == checkpoint.get("data")
        except (FileNotFoundError, ValueError) as e:
            fail(f"cannot resume: {e}")
        if not same:
            fail(f"cannot resume: {path} was trained on the data in {saved['data']}, and {config.data} holds other "
                 f"data (meta.json, shard names or sizes differ); drop --data to continue, or start a new run in "
                 f"another --out-dir")
        changes["data"] = (saved["data"], config.data)
    return config, model, checkpoint, changes


def start_model(config, given, meta, world):
    """A new model of the given settings, on the world's device."""
    vocab_size = 64 * math.ceil(meta["vocab_size"] / 64)
    try:
        model_values = {k: v for k, v in given.items() if k in MODEL_NAMES}
        return GPT(GPTConfig(vocab_size=vocab_size, **model_values)).to(world.device)
    except ValueError as e:  # a prior that breaks the contract (attention.contract_problem)
        fail(str(e))


# ----------------------------------------------------------------------------------------

def main(argv=None):
    config, given = parse_config(argv)
    world = start_world(config.device)
    # everything before the first step; a rank that stops here alone says why (World.one_voice)
    with world.one_voice():
        checkpoint, changes = None, {}
        if config.resume:
            config, raw_model, checkpoint, changes = resume_run(config, given, world)
        device = world.device  # "cpu", "cuda", "cuda:1", "mps"
        dtype = pick_dtype(config.dtype, device, training=True)
        use_compile = config.compile if config.compile is not None else device.startswith("cuda")
        try:
            meta, data = read_meta(config.data), data_fingerprint(config.data)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        if checkpoint is not None and (checkpoint["meta"].get("tokenizer"), checkpoint["meta"].get("vocab_size")) != \
                (meta.get("tokenizer"), meta.get("vocab_size")):
            fail(f"cannot resume: {config.out_dir}/last.pt was trained on {checkpoint['meta'].get('tokenizer')} tokens, "
                 f"but {config.data} holds {meta.get('tokenizer')} tokens")
        eot = meta["eot_token"]

        torch.manual_seed(config.seed)
        if checkpoint is None:
            raw_model = start_model(config, given, meta, world)
        block_size = raw_model.config.block_size
        try:
            train_loader = TokenLoader(config.data, "train", config.batch_size, block_size)
            val_loader = TokenLoader(config.data, "val", config.batch_size, block_size)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        if raw_model.config.engine == "flex" and not device.startswith("cuda"):
            fail("the flex engine has no backward off CUDA; train with --engine sdpa, chunked or auto")

        optimizer = torch.optim.AdamW(raw_model.param_groups(config.weight_decay, config.decay_embeddings,
                                                             config.prior_lr_scale),
                                      lr=config.lr, betas=(config.beta1, config.beta2),
                                      fused=device.startswith("cuda"))
        step, best_val = 0, float("inf")
        if checkpoint is not None:
            step, best_val = restore(checkpoint, optimizer, config, train_loader, device)
        log = None
        if world.main and step < config.max_steps:  # a resume may have nothing to do
            try:
                os.makedirs(config.out_dir, exist_ok=True)
                log = open(os.path.join(config.out_dir, "log.jsonl"), "a")
                if changes:  # what this resume changed, from its step on
                    resumed_with = {name: list(change) for name, change in changes.items()}
                    log.write(json.dumps({"step": step, "resumed_with": resumed_with}) + "\n")
            except OSError as e:
                fail(f"cannot write in --out-dir {config.out_dir}: {e.strerror or e}; choose another --out-dir")
    if checkpoint is not None:
        if step >= config.max_steps:
            if world.main:
                print(f"nothing to do: {config.out_dir}/last.pt is at step {step} and --max-steps is {config.max_steps}; "
                      f"raise --max-steps to train further")
            world.close()
            return
        if world.main:
            print(f"resuming from {config.out_dir}/last.pt at step {step}" + ("; changed: " + ", ".join(
                f"{name} {old} -> {new}" for name, (old, new) in changes.items()) if changes else ""))
    model = torch.compile(raw_model) if use_compile else raw_model
    # under torchrun, DDP all-reduces the gradients in the step's last backward (around a compiled
    # model, after it: the compiled backward hands DDP all its gradients at its end)
    ddp_model = DistributedDataParallel(model) if world.distributed else model
    mixed = autocast(device, dtype)

    tokens_per_step = config.batch_size * block_size * config.grad_accum * world.size
    c = raw_model.config
    flops_per_token = 6 * raw_model.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * block_size
    peak = peak_flops(device)
    if peak:
        peak *= world.size  # the job's GPUs
    if world.main:
        processes = f" x {world.size} process{'es' if world.size > 1 else ''}" if world.distributed else ""
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters | attention {c.attention} (ssmax {c.ssmax}, rope {c.rope}) "
              f"| {device}{processes} {str(dtype).removeprefix('torch.')} compile {use_compile} | "
              f"{tokens_per_step} tokens/step")

    def abort(message):  # the bar closed first, so that the one-line error stands on its own line
        bar.close()
        fail(message)

    def save(name):  # at a step boundary, with the data position of that boundary (the same on every rank)
        if not world.main:
            return
        checkpoint = make_checkpoint(raw_model, optimizer, config, data, step, best_val, step_start, world)
        try:
            save_checkpoint(checkpoint, os.path.join(config.out_dir, name))
        except OSError as e:  # a full disk, a read-only folder: save_checkpoint left the previous file as it was
            abort(f"cannot write {name} in {config.out_dir} at step {step}: {e.strerror or e}; the previous {name} "
                  f"is left as it was. Free space or fix the folder, then continue with --resume")

    def write_log(record):
        if not world.main:
            return
        try:
            log.write(json.dumps(record) + "\n")
            log.flush()
        except OSError as e:
            abort(f"cannot write {config.out_dir}/log.jsonl at step {step}: {e.strerror or e}; free space or "
                  f"fix the folder, then continue with --resume")

    step_start = train_loader.state_dict()
    model.train()
    t0, loss_value = time.time(), float("nan")
    with StopSignals("after this step", "without saving; the last checkpoint is as it was") as stop, \
            tqdm(total=config.max_steps, initial=step, desc="train", dynamic_ncols=True, disable=not world.main) as bar:
        while True:
            last_step = step == config.max_steps
            signals = world.each(stop.signum or 0)  # a signal to any rank stops every rank here
            stop_signal = int(max(signals))
            if stop_signal and not last_step:
                save("last.pt")
                world.barrier()  # no rank ends (and makes torchrun stop the others) before last.pt is written
                bar.close()
                if world.main:
                    sent_to = [str(r) for r, signum in enumerate(signals) if signum]
                    print(f"stopped by {signal.Signals(stop_signal).name} at step {step}; saved "
                          f"{config.out_dir}/last.pt (continue with --resume)"
                          + ("" if signals[0] else f"; the signal reached rank {', '.join(sent_to)}"), flush=True)
                world.close()
                sys.exit(128 + stop_signal)
            if last_step or step % config.eval_interval == 0 and step > 0:  # evaluate and save; at the end, always
                val_loss = evaluate(model, val_loader, config.eval_batches, world, mixed, eot, config.doc_mask)
                write_log({"step": step, "val_loss": val_loss})
                if world.main:
                    bar.write(f"step {step}: val loss {val_loss:.4f}")
                if val_loss < best_val:
                    best_val = val_loss
                    save("best.pt")
                save("last.pt")
                if config.keep_checkpoints:
                    save(f"step_{step}.pt")
            if last_step:
                break
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # the prior's group: --prior-lr-scale
            # the step's loss is the mean over the counted targets of all its micro-batches, on all
            # ranks (a loss mask counts a different number in each): each micro-batch's mean is
            # weighted by its share. DDP averages the ranks' gradients, hence the factor W.
            batches = read_step_share(train_loader, world, config.grad_accum)
            counts = [int((y != -1).sum()) for _, y in batches]
            counted = max(1.0, world.sum(sum(counts)))
            step_loss = 0.0
            for i, ((x, y), count) in enumerate(zip(batches, counts)):
                x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                # DDP all-reduces the gradients in the last micro-batch's backward only
                with ddp_model.no_sync() if world.distributed and i < len(batches) - 1 else nullcontext():
                    with mixed:
                        _, loss = ddp_model(x, y, doc=document_ids(x, eot) if config.doc_mask else None)
                    loss = loss * (world.size * count / counted)
                    loss.backward()
                step_loss += loss.detach()
            if config.grad_clip > 0:  # its norm before clipping goes in the log
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
            loss_value = world.sum(step_loss) / world.size
            if not math.isfinite(loss_value):
                abort(f"loss became {loss_value} at step {step}; stopping without saving. The last good "
                      f"checkpoint is {config.out_dir}/last.pt; try a lower --lr or --grad-clip")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_start = train_loader.state_dict()
            dt, t0 = time.time() - t0, time.time()
            postfix = {"loss": f"{loss_value:.3f}", "tok/s": f"{tokens_per_step / dt:,.0f}"}
            if peak:
                postfix["mfu"] = f"{100 * flops_per_token * tokens_per_step / dt / peak:.1f}%"
            bar.set_postfix(postfix)
            bar.update(1)
            if step % config.log_interval == 0:
                record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_step / dt}
                if config.grad_clip > 0:
                    record["grad_norm"] = grad_norm.item()
                write_log(record)
    if world.main:
        log.close()
        print(f"done: step {step}, train loss {loss_value:.4f}, val loss {val_loss:.4f} -> {config.out_dir}/last.pt")
    world.close()

if __name__ == "__main__":
    main()
