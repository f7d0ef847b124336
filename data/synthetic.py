"""The embedded datasets: short retrieval documents in the evaluation's own format.

Each document is the passkey prompt of Mohtashami & Jaggi (2023), as BAM evaluates it, at a
short length: the instruction, 1 to 6 filler sentences (the evaluation's cycle), the needle "The
pass key is <key>. Remember it. <key> is the pass key." at a random sentence boundary, then the
question and the key, with a random 3-7 digit key. The key after the question is marked as the
answer: prepare.py trains on the answers only. Measured (docs/findings.md, "Retrieval"): a 4-layer model
learns to retrieve from such short documents in a few hundred steps, and the skill holds far
beyond the training length; with the loss on every token, with longer filler, or with other
kinds of documents mixed in, it learned nothing in the same budget.

`python data/prepare.py tasks` mixes in the tasks where position matters, each document one task,
its question naming the task: latest and first (2 to 4 needles "The pass key is <key>." with
different keys; the question asks for the latest or the first one), and multikey (2 to 4 "special
magic <city> number" needles; the question names one city, the others are distractors). They
have no instruction prefix, so that their needles fit a 128-token row with filler between them.
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
KEY_NEEDLE = "The pass key is {key}."  # latest and first: the same sentence, stated with different keys
ORDER_QUESTIONS = {"latest": "What is the latest pass key? The latest pass key is",
                   "first": "What is the first pass key? The first pass key is"}
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


TASKS = ("passkey", "latest", "first", "multikey")


def filler(rng):
    """Log-uniform filler, 20..100 characters: 1 to 6 sentences of the passkey evaluation's cycle,
    so that a document fits in a 128-token row."""
    n_chars = int(math.exp(rng.uniform(math.log(20), math.log(100))))
    body, total = [], 0
    while total < n_chars:
        body.append(PASSKEY_FILLER[len(body) % len(PASSKEY_FILLER)])
        total += len(body[-1]) + 1
    return body


def random_keys(rng, n, digits):
    """n different keys of `digits` digits, as strings."""
    return [str(k) for k in rng.sample(range(10 ** (digits - 1), 10 ** digits), n)]


def with_needles(body, needles, rng):
    """body with the needles inserted in their order at random sentence boundaries (several may
    share one)."""
    boundaries = sorted(rng.randint(0, len(body)) for _ in needles)
    for k in reversed(range(len(needles))):
        body = body[:boundaries[k]] + [needles[k]] + body[boundaries[k]:]
    return body


def passkey_document(rng):
    """One passkey document as pieces (text, is_answer), to be joined by single spaces."""
    digits = rng.randint(3, 7)
    key = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    body = filler(rng)
    body.insert(rng.randint(0, len(body)), PASSKEY_NEEDLE.format(key=key))
    return [(text, False) for text in [PASSKEY_PREFIX] + body + [PASSKEY_QUESTION]] + [(f"{key}.", True)]


def order_document(rng, task):
    """latest or first: 2 to 4 needles "The pass key is <key>." with different keys of 3 to 7 digits."""
    keys = random_keys(rng, rng.randint(2, 4), rng.randint(3, 7))
    body = with_needles(filler(rng), [KEY_NEEDLE.format(key=k) for k in keys], rng)
    answer = keys[-1] if task == "latest" else keys[0]
    return [(text, False) for text in body + [ORDER_QUESTIONS[task]]] + [(f"{answer}.", True)]


def multikey_document(rng):
    """2 to 4 city needles with different numbers of 3 to 7 digits; the question names one city."""
    cities = rng.sample(CITIES, rng.randint(2, 4))
    numbers = random_keys(rng, len(cities), rng.randint(3, 7))
    body = with_needles(filler(rng), [NIAH_NEEDLE.format(city=c, number=n) for c, n in zip(cities, numbers)], rng)
    asked = rng.randrange(len(cities))
    return [(text, False) for text in body + [NIAH_QUESTION.format(city=cities[asked])]] + [(f"{numbers[asked]}.", True)]


def document(rng, task="passkey"):
    return multikey_document(rng) if task == "multikey" else order_document(rng, task) if task in ORDER_QUESTIONS \
        else passkey_document(rng)


def text_of(pieces):
    return " ".join(text for text, _ in pieces)


def vocabulary(tasks=TASKS):
    """Every word, digit and punctuation mark the documents of these tasks and the evaluations'
    passkey and niah prompts use: the word-level tokenizer's vocabulary (data/tokenizer.py), in a
    fixed order. Passkey data lacks the words of latest and first, so that a model trained on it
    is refused those tasks rather than asked questions it has never seen."""
    texts = PASSKEY_FILLER + CITIES + [PASSKEY_PREFIX, PASSKEY_NEEDLE, PASSKEY_QUESTION, NIAH_NEEDLE, NIAH_QUESTION]
    texts += [ORDER_QUESTIONS[task] for task in tasks if task in ORDER_QUESTIONS]
    words = {w for text in texts for w in re.findall(r"[A-Za-z]+", re.sub(r"{\w+}", " ", text))}
    return sorted(words) + list("0123456789.,?:'")


def generate_documents(n_docs, seed, tasks=("passkey",)):
    """Yield n_docs documents (lists of (text, is_answer) pieces), each of a task drawn uniformly
    from `tasks`; the same seed and tasks give the same documents (passkey alone: the same as
    before the other tasks existed)."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield document(rng, rng.choice(tasks) if len(tasks) > 1 else tasks[0])
