"""Token shards in the llm.c / modded-nanogpt .bin format, and the dataset's meta.json.

A shard is a header of 256 int32 (magic 20240520, version 1, token count, zeros) followed by
the tokens as uint16, all little-endian. A prepared dataset is a folder of train_*.bin,
val_*.bin and a meta.json saying how it was made (tokenizer, counts, settings), and optionally
loss_mask/*.bin: shards of the same names holding 1 for each token the loss counts, 0 elsewhere.
TokenLoader, at the end, reads a split's shards as training batches.
"""
import glob
import json
import os

import numpy as np

from data.tokenizer import get_tokenizer

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
LOSS_MASK_DIR = "loss_mask"  # optional: per shard, 1 where a token is a training target, 0 where not
SOURCES = ("synthetic", "tasks", "text", "shakespeare", "fineweb")  # the subcommands of data/prepare.py


def prepare_command(folder):
    """The data/prepare.py command line that builds `folder`, for error messages."""
    source = os.path.basename(os.path.normpath(folder))
    source = source if source in SOURCES else "<source>"
    cmd = f"python data/prepare.py {source}" + (" --input FILES" if source == "text" else "")
    if os.path.normpath(folder) != os.path.join("data", source):
        cmd += f" --out {folder}"
    return cmd


def _atomic_write(path, chunks):
    """Write byte chunks to a temp file next to `path`, then rename it into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _check_range(tokens):
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"token ids must be in [0, 65535] to fit a uint16 shard, got max {tokens.max()}")


def write_shard(path, tokens):
    """Write one shard atomically (a reader never sees a half-written file)."""
    tokens = np.asarray(tokens)
    _check_range(tokens)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    _atomic_write(path, [header.tobytes(), tokens.astype("<u2").tobytes()])


def read_header(path):
    """Validate a shard's header and size; return its token count."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    header = np.frombuffer(raw, dtype="<i4") if len(raw) == HEADER_BYTES else np.zeros(HEADER_INTS, "<i4")
    rebuild = f"re-run {prepare_command(os.path.dirname(path))} --force"
    if header[0] != MAGIC:
        raise ValueError(f"{path}: not a token shard (bad magic, expected {MAGIC}); {rebuild}")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION}); {rebuild}")
    count, size = int(header[2]), os.path.getsize(path)
    if size != HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: truncated or padded shard ({size} bytes, header says {count} tokens "
                         f"= {HEADER_BYTES + 2 * count} bytes); {rebuild}")
    return count


def load_tokens(path):
    """Memory-map a shard's tokens as a read-only uint16 array (after validating the header)."""
    count = read_header(path)
    if count == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardWriter:
    """Stream tokens into {prefix}_000000.bin, {prefix}_000001.bin, ... of shard_size tokens
    each (the last may be shorter). Holds at most one shard in memory."""

    def __init__(self, folder, prefix, shard_size):
        self.folder, self.prefix = folder, prefix
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0  # tokens in buf
        self.files = []  # shards written so far
        self.n_tokens = 0  # tokens added so far

    def add(self, tokens):
        tokens = np.asarray(tokens)
        _check_range(tokens)
        self.n_tokens += len(tokens)
        while len(tokens):
            n = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == len(self.buf):
                self._flush()

    def _flush(self):
        path = os.path.join(self.folder, f"{self.prefix}_{len(self.files):06d}.bin")
        write_shard(path, self.buf[:self.fill])
        self.files.append(path)
        self.fill = 0

    def close(self):
        """Write the last, partial shard; return the list of shard paths."""
        if self.fill:
            self._flush()
        return self.files


def write_meta(folder, **fields):
    _atomic_write(os.path.join(folder, "meta.json"), [json.dumps(fields, indent=2).encode()])


def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no prepared dataset in {folder} (no meta.json); make it with {prepare_command(folder)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); remake it with {prepare_command(folder)} --force") from None
    if not isinstance(meta, dict) or not {"tokenizer", "vocab_size", "eot_token"} <= set(meta):
        raise ValueError(f"{path} is not a dataset's meta.json (no tokenizer, vocab_size or eot_token); "
                         f"remake it with {prepare_command(folder)} --force")
    return meta


def data_fingerprint(folder):
    """What tells one prepared dataset from another without reading its tokens: its meta.json and
    every shard's name and size (a resume compares it when --data names another folder)."""
    files = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, LOSS_MASK_DIR, "*.bin"))
    return {"meta": read_meta(folder), "shards": {os.path.relpath(f, folder): os.path.getsize(f) for f in sorted(files)}}


def tokenizer_from_meta(meta):
    """The tokenizer a prepared dataset was made with (a words dataset records its word list)."""
    return get_tokenizer(meta["tokenizer"], meta.get("ranks_file"), meta.get("words"))


# ----------------------------------------------------------------------------------------
# batches

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

    def skip(self):
        """Move past the next batch without reading it (another process of a torchrun job reads it);
        returns the (shard, position) where it starts."""
        n = self.B * self.T
        while self.pos + n + 1 > self.sizes[self.shard]:  # not enough left: next shard
            self.shard, self.pos = (self.shard + 1) % len(self.files), 0
        self.pos += n
        return self.shard, self.pos - n

    def next_batch(self):
        """Return x, y: int64 arrays of shape (B, T), y is x shifted left by one token."""
        shard, pos = self.skip()
        n = self.B * self.T
        # re-map per batch: a memmap held for a whole run grows resident memory (nanoGPT #287)
        tokens = load_tokens(self.files[shard])
        buf = np.array(tokens[pos:pos + n + 1], dtype=np.int64)
        x, y = buf[:-1].reshape(self.B, self.T), buf[1:].reshape(self.B, self.T)
        if self.masks is not None:
            counted = load_tokens(self.masks[shard])[pos + 1:pos + n + 1].reshape(self.B, self.T)
            y = np.where(counted == 1, y, -1)
        return x, y
