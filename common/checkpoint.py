"""
Checkpoints and results: plain tensors and dicts, written atomically (a temporary file, flushed, then
renamed); model.load_checkpoint reads them with torch.load(..., weights_only=True), so nothing in a file
is executed. What a training checkpoint holds, how a run restores it, and what --resume may change.
"""
import json
import os
from dataclasses import asdict

import torch


def atomic_write(path, write):
    """write(f) into a temporary file in the same folder, flush it to disk, then rename it over
    `path`: a crash or Ctrl-C mid-write leaves the previous file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def save_json(value, path):
    """Results as JSON, written atomically like checkpoints."""
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def make_checkpoint(raw_model, optimizer, config, data, step, best_val, loader_state, world):
    """What train.py saves at a step boundary: the model and its config, the optimizer, the run's
    settings, the data (data.shards.data_fingerprint), the data position, the random states and the
    number of processes."""
    rng = {"cpu": torch.get_rng_state()}
    if world.device.startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state(world.device)
    return {"model": raw_model.state_dict(), "model_config": asdict(raw_model.config),
            "optimizer": optimizer.state_dict(), "train_config": asdict(config), "meta": data["meta"], "data": data,
            "step": step, "best_val_loss": best_val, "loader": loader_state, "rng": rng, "world_size": world.size}


def restore(checkpoint, optimizer, config, train_loader, device):
    """The optimizer, data position and random state of a checkpoint, with the config's AdamW settings
    (a resume may change them); returns its (step, best val loss)."""
    saved = checkpoint["optimizer"]
    if len(saved["param_groups"]) == 2:  # saved before the prior had a group of its own: its parameters are
        decay, rest = saved["param_groups"]  # the last ones of the second group (GPT.param_groups)
        split = len(rest["params"]) - len(optimizer.param_groups[2]["params"])
        saved = saved | {"param_groups": [decay, rest | {"params": rest["params"][:split]},
                                          rest | {"params": rest["params"][split:]}]}
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:  # load_state_dict brought the saved ones back
        group["betas"] = (config.beta1, config.beta2)
    optimizer.param_groups[0]["weight_decay"] = config.weight_decay  # the decayed group (GPT.param_groups)
    optimizer.param_groups[2]["lr_scale"] = config.prior_lr_scale  # the prior's group
    train_loader.load_state_dict(checkpoint["loader"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if "cuda" in checkpoint["rng"] and device.startswith("cuda"):
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return checkpoint["step"], checkpoint["best_val_loss"]


# ----------------------------------------------------------------------------------------
# what --resume may change (docs/resume.md). A resumed run takes its checkpoint's
# settings, but for THIS_MACHINE's, which are the command's. A setting given again with another
# value is applied from the resumed step on, and said, where RESUME_CHANGES lists it: how the run
# executes, or its optimisation from here on. Any other change is refused with the reason below:
# what the model is, or what decides the data it reads (train.py checks --batch-size and
# --grad-accum with distributed.check_world, and --data by the data it holds).

THIS_MACHINE = ("device", "dtype", "compile")
RUNTIME_FIELDS = ("engine", "attn_block", "prior_grad")  # model settings of how it runs, not of what it computes
RESUME_CHANGES = (*RUNTIME_FIELDS, "eval_interval", "eval_batches", "keep_checkpoints", "log_interval", "max_steps",
                  "lr", "min_lr_ratio", "warmup_steps", "lr_decay_steps", "weight_decay", "prior_lr_scale", "beta1", "beta2",
                  "grad_clip")
RESUME_REFUSES = {"seed": "the seed starts a run (its init), while a resumed run continues its saved random state",
                  "doc_mask": "it changes what the model attends to",
                  "decay_embeddings": "it changes the optimizer's parameter groups"}
CHECKED_ELSEWHERE = ("out_dir", "resume", *THIS_MACHINE, "data", "batch_size", "grad_accum")


def resume_changes(checkpoint, given, path):
    """{name: (saved, given)} for the settings `given` with another value than the checkpoint's run had,
    where a resume may change them; raises ValueError, in one line, at the first one it may not."""
    saved = checkpoint["train_config"] | checkpoint["model_config"]
    changes = {}
    for name, value in given.items():
        if name in CHECKED_ELSEWHERE or saved.get(name) == value:
            continue
        if name not in RESUME_CHANGES:
            why = RESUME_REFUSES.get(name, "the model was built with it")
            raise ValueError(f"{path} was trained with {name}={saved.get(name)!r}, not {value!r}, and {why}; drop "
                             f"the flag to continue, or start a new run in another --out-dir")
        changes[name] = (saved.get(name), value)
    return changes
