"""Bad values for every kind of setting of every script: each stops with one line naming the
setting, the value and the fix, exit status 2, no traceback; the same check whether a value
comes from a flag or from a JSON or TOML config file."""
import os
import subprocess
import sys

import pytest
import torch

import eval_extrapolate
import sample
import train
from common import settings
from common.settings import check, run_main
from data import prepare
from tools import bench
from tools import selfcheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAINS = {"train.py": train.main, "sample.py": sample.main, "eval_extrapolate.py": eval_extrapolate.main,
         "tools/bench.py": bench.main, "tools/selfcheck.py": selfcheck.main, "data/prepare.py": prepare.main}
EVAL = ["--ckpt", "never-read.pt"]

BAD_FLAGS = [  # script, flags, what the one line must say
    ("train.py", ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    ("train.py", ["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    ("train.py", ["--min-lr-ratio", "nan"], "argument --min-lr-ratio: must be a finite number >= 0 and <= 1, got nan"),
    ("train.py", ["--beta2", "1"], "argument --beta2: must be a finite number >= 0 and < 1, got 1.0"),
    ("train.py", ["--grad-clip", "-1"], "argument --grad-clip: must be a finite number >= 0, got -1.0"),
    ("train.py", ["--max-steps", "0"], "argument --max-steps: must be a whole number >= 1, got 0"),
    ("train.py", ["--batch-size", "ten"], "argument --batch-size: must be a whole number >= 1, got 'ten'"),
    ("train.py", ["--lr-decay-steps", "1.5"], "argument --lr-decay-steps: must be a whole number >= 1, got '1.5'"),
    ("train.py", ["--prev-tokens", "-1"], "argument --prev-tokens: must be a whole number >= 0, got -1"),
    ("train.py", ["--dropout", "nan"], "argument --dropout: must be a finite number >= 0 and < 1, got nan"),
    ("train.py", ["--attention", "rope"], "argument --attention: invalid choice: 'rope'"),
    ("train.py", ["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    ("train.py", ["--prior-grad", "atomics"], "argument --prior-grad: invalid choice: 'atomics'"),
    ("train.py", ["--device", "tpu"], "unknown --device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    ("train.py", ["--n-embd", "30"], "n_embd 30 is not divisible by n_head 4"),
    ("sample.py", ["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got nan"),
    ("sample.py", ["--top-k", "-1"], "argument --top-k: must be a whole number >= 0, got -1"),
    ("sample.py", ["--num-samples", "0"], "argument --num-samples: must be a whole number >= 1, got 0"),
    ("sample.py", ["--max-new-tokens", "many"], "argument --max-new-tokens: must be a whole number >= 1, got 'many'"),
    ("sample.py", ["--device", "gpu"], "unknown --device 'gpu'"),
    ("eval_extrapolate.py", EVAL + ["--max-memory-gb", "inf"], "argument --max-memory-gb: must be a finite number > 0"),
    ("eval_extrapolate.py", EVAL + ["--samples", "0"], "argument --samples: must be a whole number >= 1, got 0"),
    ("eval_extrapolate.py", EVAL + ["--needles", "99"], "argument --needles: must be a whole number >= 1 and <= "),
    ("eval_extrapolate.py", EVAL + ["--patience", "-2"], "argument --patience: must be a whole number >= 0, got -2"),
    ("eval_extrapolate.py", EVAL + ["--prefix-digits", "5"], "--prefix-digits must be from 0 to 4"),
    ("eval_extrapolate.py", EVAL + ["--task", "qa"], "argument --task: invalid choice: 'qa'"),
    ("eval_extrapolate.py", EVAL + ["--out", "no/such/folder/x.json"], "no/such/folder does not exist"),
    ("eval_extrapolate.py", EVAL + ["--device", "cuda:x"], "unknown --device 'cuda:x'"),
    ("tools/bench.py", ["--peak-tflops", "nan"], "argument --peak-tflops: must be a finite number > 0, got nan"),
    ("tools/bench.py", ["--steps", "0"], "argument --steps: must be a whole number >= 1, got 0"),
    ("tools/bench.py", ["--warmup", "-1"], "argument --warmup: must be a whole number >= 0, got -1"),
    ("tools/bench.py", ["--variants", "nope,rope"], "argument --variants: unknown 'rope'; choose from nope, alibi, bam, scaleinv"),
    ("tools/bench.py", ["--sections", "speed"], "argument --sections: unknown 'speed'; choose from train, attn, long"),
    ("tools/bench.py", ["--prior-grad", "auto"], "argument --prior-grad: unknown 'auto'; choose from passes, table"),
    ("tools/bench.py", ["--lengths", "64Q"], "argument --lengths: must be a comma list of token counts"),
    ("tools/bench.py", ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ("tools/bench.py", ["--out", "no/such/folder/b.json"], "no/such/folder does not exist"),
    ("tools/selfcheck.py", ["--checks", "everything"], "argument --checks: unknown 'everything'"),
    ("tools/selfcheck.py", ["--device", "tpu"], "unknown --device 'tpu'"),
    ("data/prepare.py", ["synthetic", "--docs", "0"], "argument --docs: must be a whole number >= 1, got 0"),
    ("data/prepare.py", ["synthetic", "--pack", "-3"], "argument --pack: must be a whole number >= 0, got -3"),
    ("data/prepare.py", ["synthetic", "--seed", "-1"], "argument --seed: must be a whole number >= 0, got -1"),
    ("data/prepare.py", ["synthetic", "--tokenizer", "gpt4"], "argument --tokenizer: invalid choice: 'gpt4'"),
    ("data/prepare.py", ["text", "--input", "x", "--val-fraction", "nan"],
     "argument --val-fraction: must be a finite number > 0 and < 1, got nan"),
    ("data/prepare.py", ["shakespeare", "--val-fraction", "1"], "argument --val-fraction: must be a finite number > 0 and < 1"),
    ("data/prepare.py", ["fineweb", "--shards", "104"], "argument --shards: must be a whole number >= 1 and <= 103"),
    ("data/prepare.py", ["wikipedia"], "argument source: invalid choice: 'wikipedia'"),
]

BAD_CONFIG_FILES = [  # file name, content, what the one line must say after "<setting> in <path> "
    ("run.toml", 'max_steps = "ten"\n', "max_steps in {} must be a whole number >= 1, got 'ten'"),
    ("run.toml", "lr = nan\n", "lr in {} must be a finite number > 0, got nan"),
    ("run.toml", "min_lr_ratio = inf\n", "min_lr_ratio in {} must be a finite number >= 0 and <= 1, got inf"),
    ("run.toml", "lr_decay_steps = 0\n", "lr_decay_steps in {} must be a whole number >= 1, got 0"),
    ("run.toml", "attention = 3\n", "attention in {} must be one of nope, alibi, bam, scaleinv, got 3"),
    ("run.json", '{"lr": "0.1"}', "lr in {} must be a finite number > 0, got '0.1'"),
    ("run.json", '{"doc_mask": 1}', "doc_mask in {} must be true or false, got 1"),
    ("run.json", '{"n_layer": 2.5}', "n_layer in {} must be a whole number >= 1, got 2.5"),
    ("run.json", '{"batch_size": null}', "batch_size in {} must be a whole number >= 1, got None"),
    ("run.json", '{"dtype": "float16"}', "dtype in {} must be one of auto, float32, bfloat16, got 'float16'"),
    ("run.json", '{"beta1": -0.5}', "beta1 in {} must be a finite number >= 0 and < 1, got -0.5"),
    ("run.json", "[1, 2]", "config file {} must hold a table of settings, not a list"),
    ("run.toml", '[scaleinv]\nrope = "some"\n', "rope of the [scaleinv] table in {} must be one of none, full, partial"),
    ("run.toml", "[bam]\nlearning_rate = 1\n", "config file {} has unknown settings ['learning_rate'] of the [bam] table"),
    ("run.toml", '[alibi]\nattention = "bam"\n', "the [alibi] table in {} sets attention"),
    ("run.toml", "[fire]\nqk_norm = true\n", "config file {} has unknown settings ['fire']"),  # not a variant
]


def one_line_error(capsys, script, argv):
    try:
        code = MAINS[script](argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err  # no usage, no traceback
    return lines[0]


@pytest.mark.parametrize("script, argv, message", BAD_FLAGS, ids=[" ".join([s, *a]) for s, a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_the_value_and_the_fix(script, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written anywhere: the folder stays empty
    error = one_line_error(capsys, script, argv)
    assert message in error, error
    assert "--help" in error or "use " in error  # the fix, or where to find it
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, content, message", BAD_CONFIG_FILES, ids=[c for _, c, _ in BAD_CONFIG_FILES])
def test_a_bad_config_file_value_gets_the_same_check_as_a_flag(name, content, message, capsys, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    error = one_line_error(capsys, "train.py", ["--config", str(path), "--out-dir", str(tmp_path / "out")])
    assert message.format(path) in error, error
    assert not os.path.exists(tmp_path / "out")


def test_a_variant_table_applies_to_its_variant_only_and_flags_win(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('qk_norm = false\nmax_steps = 50\n\n[scaleinv]\nrope = "none"\nqk_norm = true\n')
    settings = {argv: train.parse_config(["--config", str(path), *argv.split()])[1]
                for argv in ("--attention scaleinv", "--attention bam", "--attention scaleinv --rope partial", "")}
    assert settings["--attention scaleinv"] == {"qk_norm": True, "max_steps": 50, "rope": "none",
                                                      "attention": "scaleinv"}
    assert settings["--attention bam"] == {"qk_norm": False, "max_steps": 50, "attention": "bam"}
    assert settings["--attention scaleinv --rope partial"]["rope"] == "partial"  # the flag wins
    assert settings[""] == {"qk_norm": False, "max_steps": 50}  # bam by default: not scaleinv's settings
    path.write_text('attention = "scaleinv"\n\n[scaleinv]\nrope = "none"\n')  # the file names the variant
    assert train.parse_config(["--config", str(path)])[1]["rope"] == "none"


def test_a_dataset_with_a_broken_meta_json_is_named(capsys, tmp_path):
    (tmp_path / "meta.json").write_text("{'tokenizer': 'bytes'}")
    error = one_line_error(capsys, "train.py", ["--data", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert f"{tmp_path / 'meta.json'} is not valid JSON" in error and "data/prepare.py" in error, error
    (tmp_path / "meta.json").write_text('{"tokenizer": "bytes"}')
    error = one_line_error(capsys, "train.py", ["--data", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert f"{tmp_path / 'meta.json'} is not a dataset's meta.json" in error, error


@pytest.mark.parametrize("value, annotation, interval, problem", [
    (0, int, "[0, inf)", None), (-1, int, "[0, inf)", "must be a whole number >= 0, got -1"),
    (1.0, float, "(0, 1]", None), (0.0, float, "(0, 1]", "must be a finite number > 0 and <= 1, got 0.0"),
    (1, float, "(0, 1)", "must be a finite number > 0 and < 1, got 1"), (2, float, None, None),
    (True, int, None, "must be a whole number, got True"), (1, bool, None, "must be true or false, got 1"),
    (None, int | None, "[1, inf)", None), (None, int, "[1, inf)", "must be a whole number >= 1, got None"),
    (float("-inf"), float, None, "must be a finite number, got -inf"), ("x", str, None, None),
])
def test_check_reads_intervals_as_in_mathematics(value, annotation, interval, problem):
    assert check(value, annotation, interval) == problem


@pytest.mark.parametrize("script, argv", [("train.py", ["--lr", "nan"]), ("sample.py", ["--top-k", "-1"]),
                                          ("eval_extrapolate.py", EVAL + ["--samples", "0"]),
                                          ("tools/bench.py", ["--steps", "0"]), ("tools/selfcheck.py", ["--checks", "x"]),
                                          ("data/prepare.py", ["synthetic", "--docs", "0"])])
def test_each_script_from_the_shell(script, argv):
    """The scripts as a user runs them: one line on stderr, exit status 2, nothing else."""
    proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and f"see python {script}" in proc.stderr


def test_ctrl_c_in_a_script_is_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_main(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_one_dtype_policy_for_training_and_evaluation(monkeypatch, capsys):
    assert settings.pick_dtype("auto", "cpu") is settings.pick_dtype("auto", "cpu", training=True) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, train_dtype, eval_dtype in (((9, 0), torch.bfloat16, torch.bfloat16),
                                                ((7, 0), torch.float32, torch.float16)):  # V100: no native bf16
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert settings.pick_dtype("auto", "cuda", training=True) is train_dtype
        assert settings.pick_dtype("auto", "cuda") is eval_dtype
        assert settings.pick_dtype("float32", "cuda") is torch.float32
    with pytest.raises(SystemExit):  # bf16 asked for where it is emulated
        settings.pick_dtype("bfloat16", "cuda", training=True)
    assert "use --dtype float32" in capsys.readouterr().err
