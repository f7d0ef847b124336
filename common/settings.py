"""
Settings, checked one way wherever they come from: a flag, a JSON or TOML config file, or code.

A config field is declared with param(): its --help text, and for a number the interval it must
lie in, written as in mathematics ("(0, inf)", "[0, 1)"). check() says what is wrong with a
value in one phrase; flag_type() runs the same check on a flag's text inside argparse, and
Parser makes every script's errors one line: `error: <problem>; see python <script> --help`.
"""
import argparse
import json
import math
import os
import signal
import sys
import tomllib
import types
from dataclasses import field, fields

import torch

KINDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}


class Failure(SystemExit):
    """fail()'s exit (status 2, as argparse), carrying its message: under torchrun,
    distributed.World.one_voice gathers the ranks' messages."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message


def fail(message):
    """Stop with one line on stderr and no traceback. Under torchrun rank 0 alone says it here: the
    ranks mostly stop for the same reasons at the same point; World.one_voice lets another rank say
    a reason of its own."""
    if not quiet_rank():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise Failure(message)


def rank():
    """This process's rank in a torchrun job (train.py), None outside one."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else None


def quiet_rank():
    """True on the ranks other than 0 of a torchrun job."""
    return rank() not in (None, 0)


def rank_prefix():
    """'rank 3: ' before what a rank other than 0 says; nothing on rank 0 or in a single process."""
    return f"rank {rank()}: " if quiet_rank() else ""


def run_main(main):
    """A script's entry point: its exit status, and Ctrl-C as one line rather than a traceback
    (train.py handles Ctrl-C itself: it saves first)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


class StopSignals:
    """SIGTERM (how SLURM and Kubernetes preempt a job) or Ctrl-C asks a long run to stop at its
    next safe point (`when`), where it checks .signum and stops cleanly: train.py after the step,
    saving last.pt; eval_extrapolate.py after the prompt, with its finished cells on disk. A second
    Ctrl-C stops at once; `at_once` says what that leaves."""

    def __init__(self, when, at_once):
        self.when, self.at_once = when, at_once

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):  # os.write: print() could land inside tqdm's own write to stderr
        if self.signum is not None and signum == signal.SIGINT:  # under torchrun each rank stopped so says it
            os.write(2, f"\n{rank_prefix()}stopped at once, {self.at_once}\n".encode())
            raise SystemExit(130)
        self.signum = signum
        if not quiet_rank():
            os.write(2, f"\n{signal.Signals(signum).name}: stopping {self.when} (Ctrl-C again: at once, "
                        f"{self.at_once.split(';')[0]})\n".encode())

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def param(default, help, interval=None, choices=None):
    """A config field with its --help text, and the interval or the choices its value must be in."""
    return field(default=default, metadata={"help": help, "interval": interval, "choices": choices})


def value_type(annotation):
    """The type a setting holds: int for `int | None`."""
    if isinstance(annotation, types.UnionType):
        return next(t for t in annotation.__args__ if t is not type(None))
    return annotation


def bounds(interval):
    """'[0, 1)' -> (0.0, 1.0); the brackets say whether each end belongs to the interval."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    return low, high


def requirement(kind, interval=None):
    """In words: 'a whole number >= 1', 'a finite number >= 0 and < 1'."""
    words = KINDS[kind]
    if interval:
        low, high = bounds(interval)
        if low > -math.inf:
            words += f" {'>=' if interval[0] == '[' else '>'} {low:g}"
        if high < math.inf:
            words += f"{' and' if low > -math.inf else ''} {'<=' if interval[-1] == ']' else '<'} {high:g}"
    return words


def check(value, annotation, interval=None, choices=None):
    """What is wrong with `value` for a setting of this type (int, float | None, ...), interval and
    choices, as 'must be a whole number >= 1, got 'ten''; None when nothing is."""
    kind = value_type(annotation)
    if value is None and kind is not annotation:  # an optional setting left unset
        return None
    if isinstance(value, bool) != (kind is bool):  # True is an int to Python, not to a setting
        fits = False
    else:
        fits = isinstance(value, (int, float) if kind is float else kind)
    if fits and kind is float:
        fits = math.isfinite(value)
    if fits and interval:
        low, high = bounds(interval)
        fits = (low <= value if interval[0] == "[" else low < value) and \
               (value <= high if interval[-1] == "]" else value < high)
    if choices is not None and not (fits and value in choices):
        return f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    return None if fits else f"must be {requirement(kind, interval)}, got {value!r}"


def check_fields(config):
    """Raise ValueError naming the first field of a param() dataclass whose value is wrong."""
    for f in fields(config):
        problem = check(getattr(config, f.name), f.type, f.metadata.get("interval"), f.metadata.get("choices"))
        if problem:
            raise ValueError(f"{f.name} {problem}")


def flag_type(annotation, interval=None):
    """An argparse type= that reads a flag's text as the setting's type, then check()s it."""
    kind = value_type(annotation)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement(kind, interval)}, got {text!r}") from None
        problem = check(value, kind, interval)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def comma_list(choices):
    """An argparse type= for a comma list ('nope,bam') whose every item is one of choices."""
    def parse(text):
        items = [item.strip() for item in text.split(",")]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; choose from {', '.join(choices)}")
        return items
    return parse


def comma_ints(interval):
    """An argparse type= for a comma list of integers ('1,2,3'), each within interval ("[0, inf)")."""
    item_type = flag_type(int, interval)
    return lambda text: [item_type(item.strip()) for item in text.split(",")]


def output_file(path):
    """An argparse type= for a file written at the end of a run: its folder must exist now, not
    after an hour of work."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist; create it or give another path")
    return path


def check_recipe_values(values, settings, where, path):
    """fail() at the first unknown setting in `values` or the first value its flag would refuse."""
    unknown = sorted(set(values) - set(settings))
    if unknown:
        fail(f"config file {path} has unknown settings {unknown}{where}; see python train.py --help")
    for name, value in values.items():  # the check a flag's value gets in flag_type
        f = settings[name]
        problem = check(value, f.type, f.metadata["interval"], f.metadata["choices"])
        if problem:
            fail(f"{name}{where} in {path} {problem}; see python train.py --help")


def read_recipe(path, settings, variants):
    """A recipe file's settings (TOML or JSON, read as data; `settings`: {name: param() field}),
    checked as their flags are, and its variant tables: {variant: settings} that apply only when
    that variant is the one trained (a TOML [scaleinv] table, a JSON "scaleinv" object)."""
    if not os.path.isfile(path):
        fail(f"config file {path} not found")
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f) if path.endswith(".toml") else json.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"config file {path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}")
    if not isinstance(values, dict):
        fail(f"config file {path} must hold a table of settings, not a {type(values).__name__}")
    tables = {name: values.pop(name) for name in variants if isinstance(values.get(name), dict)}
    check_recipe_values(values, settings, "", path)
    for name, table in tables.items():
        if "attention" in table:
            fail(f"the [{name}] table in {path} sets attention; it holds the settings of --attention {name} only")
        check_recipe_values(table, settings, f" of the [{name}] table", path)
    return values, tables


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, not the usage and then the error."""

    def __init__(self, **kwargs):  # prog= names the script in the errors
        super().__init__(**{"formatter_class": argparse.RawDescriptionHelpFormatter} | kwargs)

    def error(self, message):
        fail(f"{message}; see python {self.prog} --help")


def pick_device(name):
    """'auto' is cuda, else mps, else cpu; a device asked for by name must exist here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        fail(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        fail(f"--device {name} was asked for but no such CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail("--device mps was asked for but MPS is not available; use --device cpu")
    return device


# ----------------------------------------------------------------------------------------
# the dtype policy of every script, and GPU peaks for MFU

def native_bf16():
    """True on GPUs that compute bfloat16 natively (compute capability 8.0+). Not
    torch.cuda.is_bf16_supported(): it also says yes where bf16 is emulated (T4, V100), and flex
    cannot run bf16 there."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def pick_dtype(name, device, training=False):
    """The autocast dtype for --dtype `name` (auto | float32 | bfloat16 | float16) on `device`. auto:
    bfloat16 on GPUs that compute it natively; on older GPUs float16 to evaluate (V100, T4: nanoGPT
    #84) and float32 to train (float16 would need a gradient scaler); float32 off CUDA."""
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if cuda and native_bf16():
            return torch.bfloat16
        if cuda and training:
            print("note: this GPU has no native bfloat16; training in float32")
        return torch.float16 if cuda and not training else torch.float32
    if name == "bfloat16" and cuda and not native_bf16():
        fail("this GPU does not compute bfloat16 natively; use --dtype float32" + ("" if training else " or float16"))
    return getattr(torch, name)


def autocast(device, dtype):
    """torch.autocast to dtype on device's type; nothing for float32."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


# bf16 dense tensor-core peaks in TFLOP/s; the first key found in the device's name wins
GPU_PEAKS = (("H200", "H200", 989), ("H100 PCIe", "H100 PCIe", 756), ("H100 NVL", "H100 NVL", 835),
             ("H100", "H100 SXM", 989), ("A100", "A100", 312))


def gpu_peak(device_name):
    """(label, TFLOP/s) of a known GPU from its name, else (None, None)."""
    return next(((label, tflops) for key, label, tflops in GPU_PEAKS if key in device_name), (None, None))
