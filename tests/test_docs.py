"""Every command that README.md and docs/ show runs as written: its script exists, and its flags
and values parse as the script parses them (recipes read and checked too). A template (a command
with `...`, `<name>` or `[optional flags]` in it) must name an existing script and flags it has."""
import glob
import importlib
import os
import re
import shlex

import pytest

import train
from common.settings import Parser
from tools import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
STARTS = r"(?:\w+=\S+ )*(?:time )?(?:python|torchrun|\./)"  # VAR=value and `time` before a command are allowed


def commands(page):
    """The commands of a page: lines of its indented blocks, and `inline code`, that start like one."""
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, page)).read(), flags=re.S)  # fenced code is not a command
    found = []
    for block in re.findall(r"(?:^    .*\n)+", text, re.M):
        block = re.sub(r"\\\n\s*", " ", block)  # a line continued with a backslash
        found += [line.strip() for line in block.splitlines() if re.match(r"\s*" + STARTS, line)]
    found += [code.replace("\n", " ") for code in re.findall(rf"`({STARTS}[^`]*)`", text)]
    return found


def split(command):
    """[(script, arguments)] for each command joined by &&; a shell script's arguments are None."""
    parts, words = [], []
    for word in shlex.split(command, comments=True) + ["&&"]:
        if word != "&&":
            words.append(word)
            continue
        while words and re.fullmatch(r"\w+=\S*|time", words[0]):
            words.pop(0)
        if words[0].startswith("./"):
            parts.append((words[0][2:], None))
        elif words[0] == "torchrun" or words[:2] == ["python", "-m"]:  # the launcher's flags, then the script's
            script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
            if script is not None:
                parts.append((words[script], words[script + 1:]))
        else:
            parts.append((words[1], words[2:]))
        words = []
    return parts


ALL = [(page, command) for page in PAGES for command in commands(page)]


def test_the_pages_show_commands():
    assert len(commands("README.md")) >= 20 and sum(len(commands(page)) for page in PAGES[1:]) >= 10


class Parsed(Exception):
    pass


def parser_of(script, monkeypatch):
    """The script's own argparse parser, caught when its main asks it to parse."""
    if script == "train.py":
        return train.build_parser()

    def caught(self, args=None, namespace=None):
        raise Parsed(self)
    monkeypatch.setattr(Parser, "parse_args", caught)
    module = importlib.import_module(script[:-3].replace("/", "."))
    with pytest.raises(Parsed) as e:
        module.main([])
    return e.value.args[0]


def parse(script, args, monkeypatch):
    """Parse as the script does (and stop there); train.py and compare also read their recipe."""
    if script == "train.py":
        train.parse_config(args)
    elif script == "tools/compare.py":
        compare.plan_runs(compare.parse_args(args))
    else:
        def parse_then_stop(self, args=None, namespace=None):
            raise Parsed(original(self, args, namespace))
        original = Parser.parse_args
        monkeypatch.setattr(Parser, "parse_args", parse_then_stop)
        with pytest.raises(Parsed):
            importlib.import_module(script[:-3].replace("/", ".")).main(args)


@pytest.mark.parametrize("page, command", ALL, ids=[f"{page}: {command[:60]}" for page, command in ALL])
def test_a_command_runs_as_written(page, command, monkeypatch, fire):
    """fire: README's example prior, registered as README says (`python train.py --attention fire`)."""
    monkeypatch.chdir(ROOT)
    for script, args in split(command):
        assert os.path.isfile(script), f"{page} names {script}, which does not exist"
        if args is None:
            assert os.access(script, os.X_OK), f"{script} is not executable"
        elif any("..." in a or "<" in a or a.startswith("[") for a in args):  # a template: its flags must exist
            options = parser_of(script, monkeypatch)._option_string_actions
            unknown = [a.strip("[]") for a in args if a.strip("[]").startswith("--") and a.strip("[]") not in options]
            assert not unknown, f"{page}: {script} has no {unknown}"
        else:
            try:
                parse(script, args, monkeypatch)
            except SystemExit as e:
                assert e.code in (0, None), f"{page}: `{command}` does not parse (exit {e.code})"
