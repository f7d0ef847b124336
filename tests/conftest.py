"""Fixtures more than one test file uses."""
import os
import re

import pytest
import torch
import torch.nn as nn

from attention import VARIANTS, prior_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fire(monkeypatch):
    """The FIRE class of the README's "Adding a prior", with its registry line run as written."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    code = re.search(r"```python\n(.*?)```", readme[readme.index("## Adding a prior"):], re.S).group(1)
    monkeypatch.setitem(VARIANTS, "fire", None)  # the registry line below replaces it; undone after the test
    namespace = {"nn": nn, "torch": torch, "prior_score": prior_score, "VARIANTS": VARIANTS}
    exec(code, namespace)
    assert VARIANTS["fire"] is namespace["FIRE"]
    return namespace["FIRE"]
