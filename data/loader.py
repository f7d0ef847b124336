"""Sequential, resumable batches of (input, target) token windows from a folder of shards."""
import glob
import os

import numpy as np

from data.shards import LOSS_MASK_DIR, load_tokens, prepare_command, read_header


class TokenLoader:
    """Walks the split's shards ({split}_*.bin, sorted) front to back, B*T tokens per batch,
    wrapping around after the last. A shard's tail shorter than B*T+1 tokens is skipped. Where
    the dataset has loss masks, targets the mask leaves out are -1 (the loss ignores them)."""

    def __init__(self, folder, split, batch_size, block_size):
        assert split in ("train", "val"), split
        self.files = sorted(glob.glob(os.path.join(folder, f"{split}_*.bin")))
        if not self.files:
            raise FileNotFoundError(f"no {split}_*.bin in {folder}; run {prepare_command(folder)}")
        self.sizes = [read_header(f) for f in self.files]
        self.masks = [os.path.join(folder, LOSS_MASK_DIR, os.path.basename(f)) for f in self.files]
        if not all(os.path.exists(m) for m in self.masks):
            self.masks = None
        elif [read_header(m) for m in self.masks] != self.sizes:
            raise ValueError(f"the loss masks in {os.path.join(folder, LOSS_MASK_DIR)} do not match the {split} shards; "
                             f"run {prepare_command(folder)} --force")
        self.B, self.T = batch_size, block_size
        need = self.B * self.T + 1
        if max(self.sizes) < need:
            what = f"the {split} split" if len(self.files) == 1 else f"the largest {split} shard"
            raise ValueError(f"{what} in {folder} has {max(self.sizes)} tokens, need at least B*T+1 = {need}; "
                             f"lower --batch-size/--block-size")
        self.reset()

    def reset(self):
        self.shard, self.pos = 0, 0

    def state_dict(self):
        return {"shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        if not 0 <= state["shard"] < len(self.files):
            raise ValueError(f"loader state names shard {state['shard']}, but there are {len(self.files)}")
        self.shard, self.pos = state["shard"], state["pos"]

    def next_batch(self):
        """Return x, y: int64 arrays of shape (B, T), y is x shifted left by one token."""
        n = self.B * self.T
        while self.pos + n + 1 > self.sizes[self.shard]:  # not enough left: next shard
            self.shard, self.pos = (self.shard + 1) % len(self.files), 0
        # re-map per batch: a memmap held for a whole run grows resident memory (nanoGPT #287)
        tokens = load_tokens(self.files[self.shard])
        buf = np.array(tokens[self.pos:self.pos + n + 1], dtype=np.int64)
        x, y = buf[:-1].reshape(self.B, self.T), buf[1:].reshape(self.B, self.T)
        if self.masks is not None:
            counted = load_tokens(self.masks[self.shard])[self.pos + 1:self.pos + n + 1].reshape(self.B, self.T)
            y = np.where(counted == 1, y, -1)
        self.pos += n
        return x, y
