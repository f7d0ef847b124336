"""
Checkpoints and results: plain tensors and dicts, written atomically (a temporary file, flushed, then
renamed), and loaded with torch.load(..., weights_only=True), so nothing in a file is executed.
"""
import json
import os
import pickle
import struct
from dataclasses import fields

import torch

from model import GPT, GPTConfig


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


def upgraded_config(saved):
    """A checkpoint's model config in today's fields: checkpoints from before the previous-token path
    trained without it, and `bam_per_layer` (per-layer priors for bam only) became `prior_per_layer`."""
    saved = {"prev_tokens": 0, "key_offset": False} | saved
    if "bam_per_layer" in saved:
        saved["prior_per_layer"] = saved.pop("bam_per_layer") and saved.get("attention") == "bam"
    return saved


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint and rebuild its model. Returns (model, checkpoint dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one with python train.py --out-dir ...")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        checkpoint["model_config"] = upgraded_config(checkpoint["model_config"])
        unknown = set(checkpoint["model_config"]) - {f.name for f in fields(GPTConfig)}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError, struct.error) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError):  # torch's own message would suggest weights_only=False
            first_line = "not a PyTorch file of tensors and plain values"
        raise ValueError(f"{path} is not a checkpoint of this project's GPT ({first_line})") from None
    return model.to(device), checkpoint
