"""Tokenizers through tiktoken: GPT-2 BPE (downloaded, or from a local ranks file) and raw bytes."""
import base64
import os

import tiktoken

TOKENIZERS = ("bytes", "gpt2")
EOT = "<|endoftext|>"
GPT2_EOT = 50256  # GPT-2's <|endoftext|> id; vocab size 50257
# GPT-2's pre-tokenization regex (tiktoken's r50k pattern)
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path):
    """Read a .tiktoken ranks file: one "base64(token) rank" per line.
    (tiktoken.load.load_tiktoken_bpe caches even local files by path in /tmp, so an edited
    file at the same path would be read stale; the format is simple enough to read here.)"""
    with open(path, "rb") as f:
        try:
            return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
        except ValueError:
            raise ValueError(f"{path} is not a tiktoken ranks file (lines of 'base64-token rank')") from None


def get_tokenizer(name, ranks_file=None):
    """Return a tiktoken Encoding by name. "bytes": 256 byte tokens + <|endoftext|> = 256, no
    download. "gpt2": GPT-2 BPE, downloaded by tiktoken on first use, or built offline from
    ranks_file (e.g. the gpt2.tiktoken that openai/whisper ships)."""
    if name == "bytes":
        ranks = {bytes([i]): i for i in range(256)}
        return tiktoken.Encoding(name="bytes", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={EOT: 256})
    if name == "gpt2":
        if ranks_file is None:
            return tiktoken.get_encoding("gpt2")
        if not os.path.isfile(ranks_file):
            raise ValueError(f"GPT-2 ranks file {ranks_file} not found; give the path of a gpt2.tiktoken "
                             f"file, or no ranks file to let tiktoken download the GPT-2 BPE")
        return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT, mergeable_ranks=load_ranks(ranks_file),
                                 special_tokens={EOT: GPT2_EOT})
    raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")
