"""Tokenizers: raw bytes and a word-level vocabulary (both offline), and GPT-2 BPE through tiktoken."""
import base64
import os
import re

import tiktoken

TOKENIZERS = ("words", "bytes", "gpt2")
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


class WordTokenizer:
    """One token per known word (with or without its leading space), per digit and per
    punctuation mark; any other text falls back to byte tokens, so every string round-trips.
    Ids: 0-255 the bytes, 256 <|endoftext|>, then the words. Digits are single tokens, so a
    key is copied digit by digit (a small model learns that far faster than copying bytes of
    BPE chunks). Same interface as the tiktoken Encoding that the scripts use."""
    name = "words"
    pattern = re.compile(r"'s| ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]|\s+")

    def __init__(self, words):
        self.words = list(words)
        self.pieces = [bytes([i]) for i in range(256)] + [EOT.encode()]
        self.pieces += [p.encode() for w in self.words for p in (w, " " + w)]
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.eot_token, self.n_vocab = 256, len(self.pieces)

    def encode_ordinary(self, text):
        out = []
        for piece in self.pattern.findall(text):
            b = piece.encode()
            out.extend([self.ids[b]] if b in self.ids else b)
        return out

    def decode_single_token_bytes(self, token):
        return self.pieces[token]

    def decode(self, tokens):
        return b"".join(self.pieces[t] for t in tokens).decode("utf-8", errors="replace")


def get_tokenizer(name, ranks_file=None, words=None):
    """Return a tokenizer by name. "words": WordTokenizer over `words` (default: the vocabulary
    of every synthetic task; a dataset's meta.json records its list). "bytes": 256 byte tokens +
    <|endoftext|> = 256, no download. "gpt2": GPT-2 BPE, downloaded by tiktoken on first use,
    or built offline from ranks_file (e.g. the gpt2.tiktoken that openai/whisper ships)."""
    if name == "words":
        if words is None:
            from data.synthetic import vocabulary
            words = vocabulary()
        return WordTokenizer(words)
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
