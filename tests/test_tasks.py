"""The tasks where position matters (latest, first, multikey): their training documents, their
prompts, and their scoring, checked with readers that follow one fixed policy (always the first
key, always another city): each must score exactly what its policy earns. CPU only, files only
under tmp_path."""
import hashlib
import json
import random
import re
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import eval_extrapolate as E
from data import prepare
from data import retrieval as R
from data.shards import load_tokens, read_meta, tokenizer_from_meta
from data.synthetic import PASSKEY_FILLER, TASKS, document, generate_documents, text_of, vocabulary
from data.tokenizer import get_tokenizer

ENC = get_tokenizer("bytes")  # one token per byte: token positions are character positions (+1 for the EOT)
UNIT = len(" " + " ".join(PASSKEY_FILLER))  # tokens per filler unit
KEY = r"The pass key is (\d+)\."
CITY = r"The special magic (\w+) number is (\d+)\."

# -----------------------------------------------------------------------------
# training documents


def answer_of(doc):
    [answer] = [text for text, is_answer in doc if is_answer]
    return answer.removesuffix(".")


def test_each_task_document_answers_its_question():
    rng = random.Random(0)
    for _ in range(200):
        latest, first, multikey = (document(rng, task) for task in ("latest", "first", "multikey"))
        keys = re.findall(KEY, text_of(latest))
        assert 2 <= len(keys) <= 4 and len(set(keys)) == len(keys) and answer_of(latest) == keys[-1]
        assert text_of(latest).endswith(f"What is the latest pass key? The latest pass key is {keys[-1]}.")
        keys = re.findall(KEY, text_of(first))
        assert 2 <= len(keys) <= 4 and answer_of(first) == keys[0]
        assert text_of(first).endswith(f"What is the first pass key? The first pass key is {keys[0]}.")
        needles = dict(re.findall(CITY, text_of(multikey)))
        asked = re.search(r"What is the special magic (\w+) number\?", text_of(multikey)).group(1)
        assert 2 <= len(needles) <= 4 and answer_of(multikey) == needles[asked]
        assert len(set(needles.values())) == len(needles)  # every other number is a distractor


def test_a_mix_draws_every_task_and_fits_a_row():
    docs = list(generate_documents(400, 5, TASKS))
    questions = [text_of(d).rsplit("?", 1)[0].rsplit(". ", 1)[-1] for d in docs]
    assert {"What is the pass key", "What is the latest pass key", "What is the first pass key"} <= set(questions)
    assert sum(q.startswith("What is the special magic") for q in questions) > 50
    enc = get_tokenizer("words")
    assert max(len(enc.encode_ordinary(text_of(d))) + 1 for d in docs) <= 128
    assert docs == list(generate_documents(400, 5, TASKS))


def test_passkey_alone_gives_the_documents_it_gave_before_the_tasks():
    """The embedded dataset stays the same: this digest is of the first 200 documents of seed
    1337, made before latest, first and multikey existed."""
    docs = list(generate_documents(200, 1337))
    assert hashlib.sha1(json.dumps(docs).encode()).hexdigest() == "9171fa5015c10968a66b591da0f405d394750af3"
    assert vocabulary(("passkey",)) == [w for w in vocabulary() if w not in ("first", "latest")]  # the same ids


def test_prepare_tasks_masks_only_the_answers(tmp_path):
    out = tmp_path / "tasks"
    assert prepare.main(["tasks", "--docs", "60", "--val-docs", "4", "--out", str(out)]) == 0
    meta = read_meta(str(out))
    assert meta["settings"]["tasks"] == list(TASKS) and {"latest", "first"} <= set(meta["words"])
    enc = tokenizer_from_meta(meta)
    tokens = np.asarray(load_tokens(str(out / "train_000000.bin")))
    mask = np.asarray(load_tokens(str(out / "loss_mask" / "train_000000.bin")))
    docs = enc.decode(tokens.tolist()).split("<|endoftext|>")[1:]
    answers = [d.rsplit(" is ", 1)[1].strip() for d in docs if d.strip()]
    assert [a.strip() for a in enc.decode(tokens[mask == 1].tolist()).split(".")[:-1]] == \
        [a.removesuffix(".") for a in answers]


def test_prepare_refuses_an_unknown_task(capsys):
    with pytest.raises(SystemExit):
        prepare.parse_args(["tasks", "--tasks", "latest,bogus"])
    assert "unknown 'bogus'" in capsys.readouterr().err

# -----------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("depth", [0, 0.5, 1])
def test_latest_and_first_share_a_prompt_whose_last_needle_sits_at_the_depth(depth):
    latest = R.order_sample(ENC, 2000, depth, 3, 5, "latest", None, random.Random(3))
    first = R.order_sample(ENC, 2000, depth, 3, 5, "first", None, random.Random(3))
    text = ENC.decode(latest["tokens"].tolist())
    keys = re.findall(KEY, text)
    assert len(set(keys)) == 3 and latest["keys"] == [keys[-1]] and first["keys"] == [keys[0]]
    assert latest["distractors"] == keys[:2] and first["distractors"] == keys[1:]
    question = latest["answers"][0][0] - len(" What is the latest pass key? The latest pass key is")
    assert (latest["tokens"][:question] == first["tokens"][:question]).all()  # the same haystack and needles
    starts = latest["all_needles_at"]
    assert latest["needle_at"] == [starts[-1]] and first["needle_at"] == [starts[0]]
    needle = len(" The pass key is 12345.")
    n_units = (question - 1 - 3 * needle) // UNIT
    assert starts == [1 + round(depth * k / 2 * n_units) * UNIT + k * needle for k in range(3)]
    assert latest["needle_depths"] == [depth] and first["needle_depths"] == [0]


def test_multikey_asks_one_city_and_the_others_distract():
    sample = R.multikey_sample(ENC, 3000, 0.25, 4, 5, None, random.Random(0))
    text = ENC.decode(sample["tokens"].tolist())
    needles = re.findall(CITY, text)
    assert sorted(c for c, _ in needles) == sorted(sample["cities"]) and len(needles) == 4
    asked = sample["cities"][0]
    assert text.endswith(f"What is the special magic {asked} number? The special magic {asked} number is "
                         f"{sample['keys'][0]}")
    numbers = dict(needles)
    assert sample["keys"] == [numbers[asked]] and sorted(sample["distractors"]) == \
        sorted(n for c, n in needles if c != asked)
    assert len(sample["answers"]) == 1 and sample["needle_at"] == sample["all_needles_at"][:1]


def test_a_vocabulary_without_the_task_refuses_it():
    old = get_tokenizer("words", words=[w for w in get_tokenizer("words").words if w not in ("latest", "first")])
    with pytest.raises(ValueError, match="missing from the vocabulary of the data.*prepare.py tasks"):
        R.order_sample(old, 200, 0.5, 3, 5, "latest", None, random.Random(0))
    assert R.multikey_sample(old, 200, 0.5, 3, 5, None, random.Random(0))  # its words are known

# -----------------------------------------------------------------------------
# scoring: readers with a fixed policy, through the evaluation's own scoring


class Reader(nn.Module):
    """Reads its input and answers by a fixed policy: pick(text) -> the key it gives. Its logits
    spell " <key>" over the answer positions, whatever the prompt's true answer is."""

    def __init__(self, pick):
        super().__init__()
        self.pick, self.config = pick, types.SimpleNamespace(vocab_size=320)

    def forward(self, idx, logits_at):
        text = ENC.decode([t for t in idx[0, :logits_at[0] + 1].tolist()])
        answer = ENC.encode_ordinary(" " + self.pick(text))
        logits = torch.zeros(1, len(logits_at), 320)
        for i in range(len(logits_at)):
            logits[0, i, answer[i] if i < len(answer) else 0] = 100.0
        return logits, None


def first_key(text):
    return re.findall(KEY, text)[0]


def last_key(text):
    return re.findall(KEY, text)[-1]


def asked_city(text):
    return dict(re.findall(CITY, text))[re.findall(r"What is the special magic (\w+) number\?", text)[-1]]


def another_city(text):
    asked = re.findall(r"What is the special magic (\w+) number\?", text)[-1]
    return next(number for city, number in re.findall(CITY, text) if city != asked)


def accuracy(reader, task, needles=3):
    args = E.parse_args(["--ckpt", "x.pt", "--task", task, "--needles", str(needles), "--samples", "3"])
    lengths, depths = [("a", 600), ("b", 1500)], [0.0, 0.5, 1.0]
    cells = E.build_cells(reader, ENC, lengths, depths, args)
    results, stopped = E.score_cells(reader, ENC, cells, "cpu", torch.no_grad())
    assert not stopped and len(results) == 2 * 3 * 3
    return sum(r["correct"] for r in results) / len(results), results


@pytest.mark.parametrize("needles", [2, 3, 4])
def test_always_the_first_key_scores_0_on_latest_and_1_on_first(needles):
    latest, results = accuracy(Reader(first_key), "latest", needles)
    assert latest == 0 and all(r["distractor"] for r in results)
    assert accuracy(Reader(first_key), "first", needles)[0] == 1
    assert accuracy(Reader(last_key), "latest", needles)[0] == 1
    first, results = accuracy(Reader(last_key), "first", needles)
    assert first == 0 and all(r["distractor"] for r in results)
    assert not any(r["distractor"] for r in accuracy(Reader(last_key), "latest", needles)[1])


def test_always_another_city_scores_0_on_multikey():
    wrong, results = accuracy(Reader(another_city), "multikey")
    assert wrong == 0 and all(r["distractor"] for r in results)
    right, results = accuracy(Reader(asked_city), "multikey")
    assert right == 1 and not any(r["distractor"] for r in results)


def test_a_task_run_records_every_needle(tmp_path):
    from tests.test_eval import save_tiny
    ckpt = save_tiny(tmp_path / "ckpt.pt")
    assert E.main(["--ckpt", ckpt, "--task", "latest", "--lengths", "1000", "--depths", "0,1", "--samples", "1"]) == 0
    result = json.loads((tmp_path / "eval_latest_ckpt.json").read_text())
    assert len(result["results"]) == 2 and all(len(r["needles_at"]) == 3 for r in result["results"])
    assert result["results"][1]["needle_at"] == result["results"][1]["needles_at"][-1]


@pytest.mark.parametrize("needles", [1, 10])
def test_a_task_needs_2_to_9_needles(needles, capsys):
    with pytest.raises(SystemExit):
        E.parse_args(["--ckpt", "x.pt", "--task", "first", "--needles", str(needles)])
    assert "needs --needles 2 to 9" in capsys.readouterr().err


def test_the_keys_of_a_prompt_differ_in_their_first_digit():
    for seed in range(50):
        for keys in (R.distinct_keys(random.Random(seed), 9, 5), R.distinct_keys(random.Random(seed), 3, 1)):
            assert len({k[0] for k in keys}) == len(keys) and all(k[0] != "0" for k in keys)
    assert {len(k) for k in R.distinct_keys(random.Random(0), 4, 30)} == {30}

