"""
Passkey, needle-in-a-haystack, latest, first and multikey prompts, built at the token level so
their length is exact, and their teacher-forced scoring (eval_extrapolate.py runs them at many
lengths).
"""
import numpy as np
import torch

from data.synthetic import (CITIES, KEY_NEEDLE, NIAH_NEEDLE, NIAH_QUESTION, ORDER_QUESTIONS, PASSKEY_FILLER,
                            PASSKEY_NEEDLE, PASSKEY_PREFIX, PASSKEY_QUESTION)

# the passkey prompt, exactly as Mohtashami & Jaggi (2023) wrote it and BAM's evaluator uses it
PREFIX = PASSKEY_PREFIX
FILLER = " ".join(PASSKEY_FILLER)  # "The grass is green. ... There and back again." = one filler unit
NEEDLE, QUESTION = PASSKEY_NEEDLE, PASSKEY_QUESTION

# prompts: built at the token level so the length in tokens is exact. Pieces are joined by
# single spaces (a piece after the first is encoded with its leading space, as BPE sees it)
# and the prompt opens with the end-of-text token, as every training document does.


def encode(enc, text):
    """Token ids of text; refuse a tokenizer that cannot give the text back."""
    tokens = enc.encode_ordinary(text)
    if enc.decode(tokens) != text:
        raise ValueError(f"the {enc.name!r} tokenizer cannot encode {text[:40]!r} (decoding does not give it back)")
    if enc.name == "words" and min(tokens, default=enc.eot_token) < enc.eot_token:  # spelt in bytes: an unknown word
        raise ValueError(f"{text.strip()[:60]!r} has words missing from the vocabulary of the data (made without this "
                         f"task): latest and first need data made by `python data/prepare.py tasks`, and a model "
                         f"trained on it")
    return tokens


def assemble(head, units, needles, tail):
    """head + haystack units with each needle inserted at its unit boundary + tail.
    needles: (boundary in 0..len(units), tokens). Returns the tokens and each needle's start."""
    tokens, starts, done = list(head), [0] * len(needles), 0
    for k in sorted(range(len(needles)), key=lambda k: needles[k][0]):
        boundary, needle = needles[k]
        for unit in units[done:boundary]:
            tokens += unit
        starts[k], done = len(tokens), boundary
        tokens += needle
    for unit in units[done:]:
        tokens += unit
    return tokens + tail, starts


def make_sample(enc, length, prefix, needles, depths, qa, haystack, rng):
    """One teacher-forced prompt of at most `length` input tokens (the last answer token is
    only a target). prefix: opening text or None; needles: texts; depths: where each goes in
    [0, 1]; qa: (question, answer) texts, asked one after another, the answer with its leading space. haystack: None for the
    repeated passkey filler, or the token ids of a text file, from which a random window is
    cut at the token level."""
    head = [enc.eot_token] + (encode(enc, prefix) if prefix else [])
    needle_tokens = [encode(enc, " " + n) for n in needles]
    tail, answers = [], []
    for i, (question, answer) in enumerate(qa):  # "... is 1234567. What is ..." as in training documents
        tail += encode(enc, (". " if i else " ") + question)
        answer_tokens = encode(enc, answer)
        answers.append((len(tail), len(tail) + len(answer_tokens)))
        tail += answer_tokens
    fixed = len(head) + sum(map(len, needle_tokens)) + len(tail) - 1
    unit = encode(enc, " " + FILLER) if haystack is None else [0]
    n_units = (length - fixed) // len(unit)
    if n_units < 1:
        raise ValueError(f"length {length} is too short for the prompt: the minimum is {fixed + len(unit)} tokens")
    if haystack is None:
        units = [unit] * n_units
    elif len(haystack) < n_units:
        raise ValueError(f"the haystack file has {len(haystack)} tokens, length {length} needs {n_units}")
    else:
        start = rng.randrange(len(haystack) - n_units + 1)
        units = [[t] for t in haystack[start:start + n_units].tolist()]
    # needle at the unit boundary nearest depth * n_units: 0 = right after the prefix (or EOT)
    # (farthest from the question), 1 = right before the question
    tokens, starts = assemble(head, units, [(round(d * n_units), n) for d, n in zip(depths, needle_tokens)], tail)
    offset = len(tokens) - len(tail)
    return {"tokens": np.array(tokens, dtype=np.int64), "needle_at": starts,
            "answers": [(offset + a, offset + b) for a, b in answers]}


def passkey_sample(enc, length, depth, digits, rng, prefix_digits=0):
    """prefix_digits: the question already gives the key's first digits, only the rest is scored
    (BAM's evaluator's `preffix_digits`)."""
    key = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    qa = (QUESTION + " " + key[:prefix_digits], key[prefix_digits:]) if prefix_digits else (QUESTION, " " + key)
    sample = make_sample(enc, length, PREFIX, [NEEDLE.format(key=key)], [depth], [qa], None, rng)
    return dict(sample, depth=depth, keys=[key])


def niah_sample(enc, length, depth, n_needles, haystack, rng):
    """Needle k goes at depth (depth + k / n) wrapped into [0, 1], so the first needle is at the
    requested depth and the others evenly spread; each is asked about in the same order. No
    instruction prefix: the papers give one for passkey only, and the needles need the room."""
    cities = rng.sample(CITIES, n_needles)
    numbers = [str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in cities]
    depths = [d - 1 if d > 1 else d for d in (depth + k / n_needles for k in range(n_needles))]
    needles = [NIAH_NEEDLE.format(city=c, number=n) for c, n in zip(cities, numbers)]
    qa = [(NIAH_QUESTION.format(city=c), " " + n) for c, n in zip(cities, numbers)]
    sample = make_sample(enc, length, None, needles, depths, qa, haystack, rng)
    return dict(sample, depth=depth, needle_depths=depths, cities=cities, keys=numbers)

def distinct_keys(rng, n, digits):
    """n keys of `digits` digits whose first digits all differ (n <= 9), so that the first digit
    of an answer says which needle it came from."""
    return [str(first) + "".join(rng.choice("0123456789") for _ in range(digits - 1))
            for first in rng.sample(range(1, 10), n)]


def order_sample(enc, length, depth, n_needles, digits, task, haystack, rng):
    """latest or first: n needles "The pass key is <key>." with different keys, needle k at depth
    depth * k / (n - 1): the last at `depth`, the first right after the opening, the others evenly
    between. The question asks for the last one (latest) or the first one; the same rng gives the
    same prompt for both. `distractors`: the keys not asked for."""
    keys = distinct_keys(rng, n_needles, digits)
    depths = [depth * k / (n_needles - 1) for k in range(n_needles)]
    asked = n_needles - 1 if task == "latest" else 0
    sample = make_sample(enc, length, None, [KEY_NEEDLE.format(key=k) for k in keys], depths,
                         [(ORDER_QUESTIONS[task], " " + keys[asked])], haystack, rng)
    return dict(sample, depth=depth, needle_depths=[depths[asked]], needle_at=[sample["needle_at"][asked]],
                all_needles_at=sample["needle_at"], keys=[keys[asked]], distractors=keys[:asked] + keys[asked + 1:])


def multikey_sample(enc, length, depth, n_needles, digits, haystack, rng):
    """n "special magic <city> number" needles placed as niah places them (the asked one at
    `depth`, the others evenly spread after it, wrapping around); the question asks for that one's
    number only, the others are distractors."""
    cities = rng.sample(CITIES, n_needles)
    numbers = distinct_keys(rng, n_needles, digits)
    depths = [d - 1 if d > 1 else d for d in (depth + k / n_needles for k in range(n_needles))]
    needles = [NIAH_NEEDLE.format(city=c, number=n) for c, n in zip(cities, numbers)]
    sample = make_sample(enc, length, None, needles, depths, [(NIAH_QUESTION.format(city=cities[0]), " " + numbers[0])],
                         haystack, rng)
    return dict(sample, depth=depth, needle_depths=[depth], needle_at=sample["needle_at"][:1],
                all_needles_at=sample["needle_at"], cities=cities, keys=numbers[:1], distractors=numbers[1:])


def task_sample(enc, task, length, depth, args, haystack, rng):
    """One prompt of a retrieval task; args: eval_extrapolate.py's flags (digits, prefix_digits, needles)."""
    if task == "passkey":
        return passkey_sample(enc, length, depth, args.digits, rng, args.prefix_digits)
    if task == "niah":
        return niah_sample(enc, length, depth, args.needles, haystack, rng)
    if task == "multikey":
        return multikey_sample(enc, length, depth, args.needles, args.digits, haystack, rng)
    return order_sample(enc, length, depth, args.needles, args.digits, task, haystack, rng)

# -----------------------------------------------------------------------------
# scoring


def answer_logits(model, sample, device="cpu"):
    """Teacher-forced logits (n_answer_tokens, vocab) at the positions that predict the answers:
    the input is the prompt plus the answers minus the last token."""
    tokens = torch.from_numpy(sample["tokens"])
    positions = torch.cat([torch.arange(a - 1, b - 1) for a, b in sample["answers"]])
    logits, _ = model(tokens[None, :-1].to(device), logits_at=positions.to(device))
    return logits[0].float().cpu()


def judge(logits, sample, enc):
    """Per answer: correct iff the argmax equals the answer token at every answer position
    (as BAM's evaluator scores it: the same as greedy decoding producing the key). `distractor`:
    its first digit is another needle's, i.e. it retrieved a needle not asked for (the keys of
    latest, first and multikey differ in their first digit; teacher forcing gives the answer the
    key's own digits after that one)."""
    def pieces(tokens):
        return [(enc.decode_single_token_bytes(t) if t < enc.n_vocab else f"<{t}>".encode()).decode("utf-8", "replace")
                for t in tokens]

    argmax, results, i = logits.argmax(dim=-1).tolist(), [], 0
    for a, b in sample["answers"]:
        guess, truth = argmax[i:i + b - a], sample["tokens"][a:b].tolist()
        said, meant = pieces(guess), pieces(truth)
        at = next((j for j, piece in enumerate(meant) if any(c.isdigit() for c in piece)), 0)  # the first digit's token
        digit, key_digit = (next((c for c in piece[at] if c.isdigit()), None) for piece in (said, meant))
        others = {key[0] for key in sample.get("distractors", ())}
        results.append({"predicted": "".join(said), "correct": guess == truth,
                        "distractor": digit != key_digit and digit in others})
        i += b - a
    return results
