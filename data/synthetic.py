"""The embedded default dataset: filler text with planted facts and questions about them.

Each document is a few to ~100 filler sentences with 1-3 facts planted at random depths and
the questions about them asked at the end, answers included, so a small byte-level model
learns to retrieve from anywhere in its window. The passkey and needle-in-a-haystack facts
use the exact wording of the evaluations (docs/papers.md); pieces are joined by single spaces.
"""
import math
import random

# the passkey evaluation's filler (Mohtashami & Jaggi 2023), in its order
PASSKEY_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again."]
OTHER_FILLER = [
    "The cat sat on the mat.", "The river runs to the sea.", "Birds fly south in winter.",
    "The road is long and quiet.", "A cold wind blows from the hills.", "The bread is warm.",
    "Snow falls on the old town.", "The dog sleeps by the fire.", "We walk along the shore.",
    "The clock ticks on the wall.", "Rain taps on the window.", "The boat drifts on the lake.",
    "Leaves turn red in autumn.", "The market opens at dawn.", "A small bell rings twice.",
    "The moon is bright tonight.", "Children play in the park.", "The tea is too hot.",
    "The train leaves at noon.", "Stars fill the night sky.", "The door creaks open.",
    "A fox runs across the field.",
]
FILLER = PASSKEY_FILLER + OTHER_FILLER
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize them. I will quiz you about the important information there.")
CITIES = [
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon",
    "Dublin", "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Athens", "Cairo", "Lagos", "Nairobi",
    "Mumbai", "Delhi", "Beijing", "Shanghai", "Seoul", "Bangkok", "Hanoi", "Jakarta", "Manila",
    "Sydney", "Melbourne", "Auckland", "Toronto", "Montreal", "Chicago", "Boston", "Seattle",
    "Denver", "Houston", "Miami", "Lima", "Bogota", "Santiago", "Quito", "Havana", "Istanbul",
    "Tehran", "Dubai", "Moscow", "Kyiv", "Budapest",
]
NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Kate",
    "Leo", "Mia", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
    "Will", "Xena", "Yuri", "Zoe",
]


def number(rng, digits):
    """A random integer with exactly `digits` digits, as a string."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def passkey(rng):
    key = number(rng, rng.randint(3, 7))
    return f"The pass key is {key}. Remember it. {key} is the pass key.", f"What is the pass key? The pass key is {key}."


def magic_number(rng, city):
    n = number(rng, 7)
    return (f"The special magic {city} number is {n}.",
            f"What is the special magic {city} number? The special magic {city} number is {n}.")


def favourite_number(rng, name):
    n = number(rng, rng.randint(1, 4))
    return f"{name}'s favourite number is {n}.", f"What is {name}'s favourite number? It is {n}."


def home_city(name, city):
    return f"{name} lives in {city}.", f"Where does {name} live? {name} lives in {city}."


def other_facts(rng, k):
    """k facts (statement, question) about distinct cities and names."""
    cities, names = rng.sample(CITIES, 2 * k), rng.sample(NAMES, k)
    makers = [lambda i: magic_number(rng, cities[i]), lambda i: favourite_number(rng, names[i]),
              lambda i: home_city(names[i], cities[k + i])]
    return [rng.choice(makers)(i) for i in range(k)]


def filler(rng, n_chars, passkey_style):
    """Sentences totalling about n_chars: the passkey cycle repeated, or drawn from the pool."""
    out, total, i = [], 0, 0
    while total < n_chars:
        s = PASSKEY_FILLER[i % len(PASSKEY_FILLER)] if passkey_style else rng.choice(FILLER)
        out.append(s)
        total += len(s) + 1
        i += 1
    return out


def repeated_codes(rng):
    """Random codes, then the same codes again: pure copying, which is what retrieval needs
    (an induction head) and what a tiny model learns fastest from dense examples."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    codes = " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 6)))
                     for _ in range(rng.randint(4, 16)))
    return f"Here are the codes: {codes}. Once more, the codes are: {codes}."


def document(rng):
    if rng.random() < 0.3:
        return repeated_codes(rng)
    is_passkey = rng.random() < 0.6
    if is_passkey:  # the eval's format, sometimes with extra facts
        facts = [passkey(rng)] + other_facts(rng, rng.choice([0, 0, 0, 1, 2]))
    else:
        facts = other_facts(rng, rng.randint(1, 3))
    # log-uniform filler length, 20..600 characters: most documents fit in the default 384-token
    # window (a needle and its question in different windows teach nothing), and the
    # needle-question distances still cover the whole window
    n_chars = int(math.exp(rng.uniform(math.log(20), math.log(600))))
    body = filler(rng, n_chars, passkey_style=is_passkey and rng.random() < 0.7)
    for statement, _ in facts:
        body.insert(rng.randint(0, len(body)), statement)
    questions = [q for _, q in facts]
    rng.shuffle(questions)
    return " ".join(([PASSKEY_PREFIX] if is_passkey else []) + body + questions)


def generate_documents(n_docs, seed):
    """Yield n_docs documents (strings); the same seed gives the same documents."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield document(rng)
