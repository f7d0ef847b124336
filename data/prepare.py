"""Prepare a dataset: token shards (train_*.bin, val_*.bin) and a meta.json in one folder.

    python data/prepare.py synthetic                        # the default: no download, seconds
    python data/prepare.py tasks                            # passkey, latest, first and multikey mixed
    python data/prepare.py text --input notes/ book.txt --out data/mytext
    python data/prepare.py shakespeare                      # downloads TinyShakespeare (1 MB)
    python data/prepare.py fineweb --shards 1               # GPT-2 tokens of FineWeb-10B, 200 MB a shard

Every document is preceded by the end-of-text token. A run builds into <out>.partial and
renames it to <out> at the end, so an interrupted run never leaves a half-made dataset, and a
second run with the same settings does nothing.
"""
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from tqdm import tqdm

from common.settings import Parser, comma_list, flag_type, run_main
from data.shards import LOSS_MASK_DIR, ShardWriter, read_header, read_meta, write_meta
from data.synthetic import TASKS, generate_documents, text_of, vocabulary
from data.tokenizer import GPT2_EOT, TOKENIZERS, get_tokenizer

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main"

# -----------------------------------------------------------------------------
# shared steps


def tokenize(docs, total, folder, args, pack=0):
    """Tokenize (split, document) pairs into {split}_*.bin shards, each document preceded by
    <|endoftext|>. A document is a text, or a list of (text, is_answer) pieces joined by spaces;
    with pieces, loss_mask/{split}_*.bin shards say which tokens are answers (1) and training
    counts the loss on those alone. pack > 0: no document shorter than pack tokens straddles a
    multiple of pack, so every training window of a multiple of pack tokens starts at a
    document (a question whose fact was cut off into the previous window teaches nothing)."""
    enc = get_tokenizer(args.tokenizer, args.ranks_file, vocabulary(args.tasks) if "tasks" in args else None)
    writers = {split: ShardWriter(folder, split, args.shard_size) for split in ("train", "val")}
    mask_dir = os.path.join(folder, LOSS_MASK_DIR)
    masks = {split: ShardWriter(mask_dir, split, args.shard_size) for split in ("train", "val")}
    for split, doc in tqdm(docs, total=total, unit="doc", desc="tokenizing"):
        if isinstance(doc, str):
            tokens, mask = [enc.eot_token] + enc.encode_ordinary(doc), None
        else:
            tokens, mask = [enc.eot_token], [0]
            for i, (text, is_answer) in enumerate(doc):
                piece = enc.encode_ordinary((" " if i else "") + text)
                tokens += piece
                mask += [int(is_answer)] * len(piece)
        if len(tokens) > 1:
            room = pack - writers[split].n_tokens % pack if pack else len(tokens)
            if len(tokens) > room:  # start the next row: end-of-text tokens outside the loss fill this one
                writers[split].add([enc.eot_token] * room)
                mask = None if mask is None else [0] * room + mask
            writers[split].add(tokens)
            if mask is not None:
                os.makedirs(mask_dir, exist_ok=True)
                masks[split].add(mask)
    files = []
    for split, writer in writers.items():
        files += [os.path.basename(f) for f in writer.close()]
        files += [os.path.join(LOSS_MASK_DIR, os.path.basename(f)) for f in masks[split].close()]
        if writer.n_tokens == 0:
            raise ValueError(f"the {split} split got no text; give more input text (or more --val-docs / --val-fraction)")
    return dict(tokenizer=args.tokenizer, ranks_file=args.ranks_file, vocab_size=enc.n_vocab,
                eot_token=enc.eot_token, train_tokens=writers["train"].n_tokens,
                val_tokens=writers["val"].n_tokens, files=files, **({"words": enc.words} if args.tokenizer == "words" else {}))


def download(url, path, check=None):
    """Fetch url to path with a byte progress bar, resuming a leftover path.part with an HTTP
    Range request. The byte count (and check(part), if given) must hold before the rename."""
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    total = None
    try:
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        with urllib.request.urlopen(request, timeout=60) as r:
            if r.status != 206:  # the server sent the whole file: start over
                have = 0
            length = r.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416 on a resume: the .part is already whole
            raise OSError(f"cannot download {url} (HTTP {e.code}); check the URL or pass --base-url") from None
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e.__class__.__name__
        raise OSError(f"cannot download {url} ({reason}); check the network and run again to resume, "
                      f"or pass --base-url") from None
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise OSError(f"download of {url} stopped at {got} of {total} bytes; run again to resume")
    if check is not None:
        try:
            check(part)
        except ValueError:
            os.remove(part)
            raise ValueError(f"{url} is not a valid token shard (bad header or size); check --base-url") from None
    os.replace(part, path)
    return path


def text_files(inputs):
    """The input files, plus every *.txt / *.md under input folders, sorted."""
    files = []
    for p in inputs:
        if os.path.isdir(p):
            files += sorted(os.path.join(d, f) for d, _, names in os.walk(p) for f in names if f.endswith((".txt", ".md")))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"--input {p}: no such file or folder")
    if not files:
        raise ValueError(f"no .txt or .md files in {' '.join(inputs)}")
    return files


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def tokenize_files(files, folder, args):
    """One document per file, the last --val-fraction of them (at least one) for val; a single
    file is split by characters instead. Files are read one at a time."""
    if len(files) == 1:
        text = read_text(files[0])
        cut = int(len(text) * (1 - args.val_fraction))
        return tokenize([("train", text[:cut]), ("val", text[cut:])], 2, folder, args)
    n_train = len(files) - max(1, round(len(files) * args.val_fraction))
    docs = (("train" if i < n_train else "val", read_text(f)) for i, f in enumerate(files))
    return tokenize(docs, len(files), folder, args)

# -----------------------------------------------------------------------------
# the sources: each fills `folder` with shards and returns the fields of meta.json


def synthetic(args, folder):
    n = args.val_docs + args.docs  # one stream: the first val_docs documents are val
    docs = (("val" if i < args.val_docs else "train", d if args.loss_on == "answers" else text_of(d))
            for i, d in enumerate(generate_documents(n, args.seed, args.tasks)))
    return dict(tokenize(docs, n, folder, args, args.pack), source=f"data/synthetic.py, seed {args.seed}, "
                                                                   f"tasks {','.join(args.tasks)}")


def text(args, folder):
    return dict(tokenize_files(text_files(args.input), folder, args), source=" ".join(args.input))


def shakespeare(args, folder):
    path = args.input or download(SHAKESPEARE_URL, os.path.join(folder, "input.txt"))
    return dict(tokenize_files([path], folder, args), source=args.input or SHAKESPEARE_URL)


def fineweb(args, folder):
    names = [("fineweb_val_000000.bin", "val_000000.bin")]
    names += [(f"fineweb_train_{i:06d}.bin", f"train_{i:06d}.bin") for i in range(1, args.shards + 1)]
    counts = {"train_tokens": 0, "val_tokens": 0}
    for remote, local in names:
        path = os.path.join(folder, local)
        if not os.path.exists(path):  # else finished by an earlier, interrupted run
            download(f"{args.base_url}/{remote}", path, check=read_header)
        counts[local.split("_")[0] + "_tokens"] += read_header(path)
    return dict(tokenizer="gpt2", ranks_file=None, vocab_size=GPT2_EOT + 1, eot_token=GPT2_EOT,
                files=[local for _, local in names], source=args.base_url, **counts)


BUILDERS = {"synthetic": synthetic, "tasks": synthetic, "text": text, "shakespeare": shakespeare, "fineweb": fineweb}

# -----------------------------------------------------------------------------


def parse_args(argv):
    parser = Parser(prog="data/prepare.py", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True, metavar="source")

    def add(name, description, tokenizes=True, tokenizer="bytes"):
        p = sub.add_parser(name, help=description, description=description)
        p.add_argument("--out", help=f"output folder (default: data/{name})")
        p.add_argument("--force", action="store_true", help="rebuild even if the output is already prepared")
        if tokenizes:
            p.add_argument("--tokenizer", choices=TOKENIZERS, default=tokenizer,
                           help="words: one token per word of the synthetic data's vocabulary, bytes for anything "
                                "else; bytes: 256 byte tokens + <|endoftext|>; gpt2: GPT-2 BPE, downloaded "
                                f"(default: {tokenizer})")
            p.add_argument("--ranks-file", help="with --tokenizer gpt2: a local GPT-2 ranks file (gpt2.tiktoken) "
                                                "instead of downloading the BPE")
            p.add_argument("--shard-size", type=flag_type(int, "[1, inf)"), default=10**7, help="tokens per shard file (default: 10M)")
        return p

    for name, tasks, description in (
            ("synthetic", "passkey", "short passkey documents in the evaluation's format, loss on the answers "
                                     "(data/synthetic.py)"),
            ("tasks", ",".join(TASKS), "a mix of short retrieval documents in the evaluation's format, each one task "
                                       "(passkey, latest, first, multikey), loss on the answers (data/synthetic.py)")):
        p = add(name, description, tokenizer="words")
        p.add_argument("--tasks", type=comma_list(TASKS), default=tasks,
                       help=f"the tasks to mix, each document one of them, drawn uniformly (default: {tasks})")
        p.add_argument("--docs", type=flag_type(int, "[1, inf)"), default=30000,
                       help="training documents (default: 30000: 3.8M word tokens of passkey, 3.2M of the four tasks)")
        p.add_argument("--val-docs", type=flag_type(int, "[1, inf)"), default=500,
                       help="validation documents (default: 500, about 50K word tokens)")
        p.add_argument("--seed", type=flag_type(int, "[0, inf)"), default=1337,
                       help="random seed; the same seed gives the same data (default: 1337)")
        p.add_argument("--pack", type=flag_type(int, "[0, inf)"), default=128,
                       help="row length: documents never straddle a multiple of it, so windows of any multiple of it "
                            "(--block-size 128, 256, 384 ...) start at a document (0: plain concatenation; default: 128)")
        p.add_argument("--loss-on", choices=("answers", "all"), default="answers",
                       help="tokens the training loss counts: the answers (what earlier text in the document "
                            "determines; a tiny model learns retrieval only so), or all (default: answers)")
    p = add("text", "local text files, one document per file")
    p.add_argument("--input", nargs="+", required=True, help="files, or folders searched recursively for *.txt and *.md")
    p.add_argument("--val-fraction", type=flag_type(float, "(0, 1)"), default=0.05,
                   help="fraction of the documents for validation, at least one; a single file is split "
                        "by characters (default: 0.05)")
    p = add("shakespeare", "TinyShakespeare (1 MB of plays, downloaded), first 90%% of characters train, last 10%% val")
    p.add_argument("--input", help="a local copy of tinyshakespeare input.txt instead of downloading it")
    p.add_argument("--val-fraction", type=flag_type(float, "(0, 1)"), default=0.1, help="fraction of characters for validation (default: 0.1)")
    p = add("fineweb", "pre-tokenized GPT-2 shards of FineWeb-10B (100M tokens, 200 MB each), as modded-nanogpt uses",
            tokenizes=False)
    p.add_argument("--shards", type=flag_type(int, "[1, 103]"), default=1, help="training shards to download, 1 to 103 (default: 1); plus one val shard")
    p.add_argument("--base-url", default=FINEWEB_URL, help=f"where the fineweb_*.bin files are (default: {FINEWEB_URL})")
    return parser.parse_args(argv)


def is_prepared(out, settings):
    try:
        meta = read_meta(out)
    except (FileNotFoundError, ValueError):
        return False
    return meta.get("settings") == settings and all(os.path.exists(os.path.join(out, f)) for f in meta["files"])


def build(args):
    out = os.path.normpath(args.out or os.path.join(DATA_DIR, args.source))
    shown = args.out or os.path.relpath(out)
    for key in ("input", "ranks_file"):  # record absolute paths: the dataset may be used from elsewhere
        value = getattr(args, key, None)
        if value:
            setattr(args, key, [os.path.abspath(v) for v in value] if isinstance(value, list) else os.path.abspath(value))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "force")}
    if not args.force and is_prepared(out, settings):
        print(f"{shown} is already prepared (use --force to rebuild)")
        return
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "meta.json")):
        raise ValueError(f"{shown} exists and is not a prepared dataset (no meta.json); choose another --out")
    partial = out + ".partial"
    resumable = args.source == "fineweb"  # keeps finished downloads and .part files in partial
    if not resumable:
        shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial, exist_ok=True)
    try:
        meta = BUILDERS[args.source](args, partial)
    except BaseException:
        if not resumable:
            shutil.rmtree(partial)
        raise
    write_meta(partial, settings=settings, **meta)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    print(f"wrote {shown}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")


def main(argv=None):
    args = parse_args(argv)
    try:
        build(args)
    except (ValueError, OSError) as e:  # expected failures: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main)
