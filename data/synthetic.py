"""The embedded default dataset: passkey documents in the evaluation's own format.

Each document is the passkey prompt of Mohtashami & Jaggi (2023), as BAM evaluates it, at a
short length: the instruction, 1 to 6 filler sentences (the evaluation's cycle), the needle "The
pass key is <key>. Remember it. <key> is the pass key." at a random sentence boundary, then the
question and the key, with a random 3-7 digit key. The key after the question is marked as the
answer: prepare.py trains on the answers only. Measured (docs/findings.md, "Retrieval"): a 4-layer model
learns to retrieve from such short documents in a few hundred steps, and the skill holds far
beyond the training length; with the loss on every token, with longer filler, or with other
kinds of documents mixed in, it learned nothing in the same budget.
"""
import math
import random
import re

# the passkey evaluation's filler (Mohtashami & Jaggi 2023), in its order
PASSKEY_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again."]
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize them. I will quiz you about the important information there.")
# the evaluations' needles and questions (Mohtashami & Jaggi's, as BAM evaluates them);
# eval_extrapolate.py builds its prompts from these
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NIAH_NEEDLE = "The special magic {city} number is {number}."
NIAH_QUESTION = "What is the special magic {city} number? The special magic {city} number is"
CITIES = [
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon",
    "Dublin", "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Athens", "Cairo", "Lagos", "Nairobi",
    "Mumbai", "Delhi", "Beijing", "Shanghai", "Seoul", "Bangkok", "Hanoi", "Jakarta", "Manila",
    "Sydney", "Melbourne", "Auckland", "Toronto", "Montreal", "Chicago", "Boston", "Seattle",
    "Denver", "Houston", "Miami", "Lima", "Bogota", "Santiago", "Quito", "Havana", "Istanbul",
    "Tehran", "Dubai", "Moscow", "Kyiv", "Budapest",
]


def document(rng):
    """One passkey document as pieces (text, is_answer), to be joined by single spaces."""
    digits = rng.randint(3, 7)
    key = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    # log-uniform filler, 20..100 characters: 1 to 6 sentences, so a document fits in a 128-token row
    n_chars = int(math.exp(rng.uniform(math.log(20), math.log(100))))
    body, total = [], 0
    while total < n_chars:
        body.append(PASSKEY_FILLER[len(body) % len(PASSKEY_FILLER)])
        total += len(body[-1]) + 1
    body.insert(rng.randint(0, len(body)), PASSKEY_NEEDLE.format(key=key))
    return [(text, False) for text in [PASSKEY_PREFIX] + body + [PASSKEY_QUESTION]] + [(f"{key}.", True)]


def text_of(pieces):
    return " ".join(text for text, _ in pieces)


def vocabulary():
    """Every word, digit and punctuation mark these documents and the evaluations' prompts use:
    the word-level tokenizer's vocabulary (data/tokenizer.py), in a fixed order."""
    texts = PASSKEY_FILLER + CITIES + [PASSKEY_PREFIX, PASSKEY_NEEDLE, PASSKEY_QUESTION, NIAH_NEEDLE, NIAH_QUESTION]
    words = {w for text in texts for w in re.findall(r"[A-Za-z]+", re.sub(r"{\w+}", " ", text))}
    return sorted(words) + list("0123456789.,?:'")


def generate_documents(n_docs, seed):
    """Yield n_docs documents (lists of (text, is_answer) pieces); the same seed gives the same documents."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield document(rng)
