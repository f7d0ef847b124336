"""train.py under torchrun on the CPU: 2 processes with gloo, launched as a user would
(python -m torch.distributed.run --standalone --nproc_per_node=2 train.py ...)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from model import load_checkpoint
from data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "64",
        "--batch-size", "4", "--eval-batches", "3", "--log-interval", "1", "--warmup-steps", "2",
        "--lr-decay-steps", "1000"]  # a schedule that does not depend on --max-steps: runs of any length compare

HANG = 900  # seconds after which a job that has not ended counts as hung: the waits below are for events, not time

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks' processes in /proc (Linux)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The synthetic passkey data, with its loss mask on (the loss counts the answers only)."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    assert prepare.main(["synthetic", "--docs", "60", "--val-docs", "10", "--out", str(out)]) in (0, None)
    assert os.path.isdir(out / "loss_mask")
    return str(out)


def torchrun(data_dir, out_dir, *flags, env=None):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--data", data_dir, "--out-dir", str(out_dir), *TINY, *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=None if env is None else dict(os.environ, **env))


def one_process(data_dir, out_dir, *flags):
    train.main(["--data", data_dir, "--out-dir", str(out_dir), *TINY, *flags])


def finish(proc):
    try:
        out, _ = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        end_job(proc)
        pytest.fail(f"the job did not end in {HANG} s (a rank hangs): {proc.communicate()[0][-3000:]}")
    return proc.returncode, out


def end_job(proc):
    """SIGKILL to the ranks and torchrun (the ranks run in sessions of their own)."""
    for pid in (rank_pid(proc, 0), rank_pid(proc, 1)):
        if pid:
            os.kill(pid, signal.SIGKILL)
    proc.kill()


def rank_pid(proc, rank):
    """The pid of the worker of `rank` that torchrun `proc` started."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if ppid == proc.pid and f"RANK={rank}".encode() in env:
            return int(pid)


def writing_checkpoint(pid, folder):
    """True while process `pid` has a .pt file in `folder` open (a checkpoint being written)."""
    try:
        paths = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(p.startswith(str(folder)) and ".pt" in os.path.basename(p) for p in paths)


def wait_for(proc, done, what, poll=0.05):
    """Until done() is true: the job ending first, or not ending in HANG seconds, fails the test."""
    deadline = time.time() + HANG
    while not done():
        if proc.poll() is not None or time.time() > deadline:
            end_job(proc)
            pytest.fail(f"no {what}: {proc.communicate()[0][-3000:]}")
        time.sleep(poll)


def log_lines(out_dir):
    """The records of log.jsonl written so far (a line still being written is not one yet)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def assert_same_training(a_dir, b_dir, rtol=1e-5, atol=1e-7):
    """The same steps, losses, gradient norms, data position and weights, to float32 rounding."""
    a, b = torch.load(a_dir / "last.pt", weights_only=True), torch.load(b_dir / "last.pt", weights_only=True)
    assert a["step"] == b["step"] and a["loader"] == b["loader"]
    logs = [{r["step"]: r for r in log_lines(d) if "loss" in r} for d in (a_dir, b_dir)]
    steps = sorted(set(logs[0]) & set(logs[1]))
    assert steps and steps[-1] == a["step"]
    for key in ("loss", "grad_norm"):
        pairs = [(logs[0][s][key], logs[1][s][key]) for s in steps]
        assert all(abs(x - y) <= rtol * abs(y) for x, y in pairs), (key, pairs)
    for name, weight in a["model"].items():
        assert torch.allclose(weight, b["model"][name], rtol=rtol, atol=atol), (name, (weight - b["model"][name]).abs().max())
    return a, b


def test_two_processes_train_what_one_trains_with_twice_the_grad_accum(data_dir, tmp_path):
    """World 2 x --grad-accum 2 reads the 4 micro-batches one process reads with --grad-accum 4, each
    weighted by its counted targets over all ranks: the same losses, gradients and weights."""
    returncode, out = finish(torchrun(data_dir, tmp_path / "two", "--grad-accum", "2", "--max-steps", "3"))
    assert returncode == 0, out[-3000:]
    assert "cpu x 2 processes" in out and out.count("done: step 3") == 1  # rank 0 alone reports
    one_process(data_dir, tmp_path / "one", "--grad-accum", "4", "--max-steps", "3")
    two, one = assert_same_training(tmp_path / "two", tmp_path / "one")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert abs(two["best_val_loss"] - one["best_val_loss"]) < 1e-5 * one["best_val_loss"]  # the val loss, averaged


def test_bad_input_under_torchrun_is_one_line_from_rank_0(data_dir, tmp_path):
    returncode, out = finish(torchrun(data_dir, tmp_path, "--resume"))
    errors = [line for line in out.splitlines() if "error:" in line]
    assert returncode != 0 and len(errors) == 1, out[-3000:]
    assert errors[0].startswith(f"error: cannot resume: no checkpoint at {tmp_path}/last.pt; train one with")


def test_a_failure_on_one_rank_alone_is_said_by_that_rank(data_dir, tmp_path):
    """Rank 1 alone does not find the data (as on a node without the shared folder): it says so,
    after its rank, and every rank stops."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':  # this rank's node lacks the data\n"
        "    import data.shards as shards\n"
        "    original = shards.read_meta\n"
        "    shards.read_meta = lambda folder: original(os.path.join(folder, 'not-on-this-node'))\n")
    returncode, out = finish(torchrun(data_dir, tmp_path / "out", "--max-steps", "2",
                                      env={"PYTHONPATH": os.pathsep.join([str(hook), ROOT])}))
    errors = [line for line in out.splitlines() if "error:" in line]
    assert returncode != 0 and len(errors) == 1, out[-3000:]
    assert errors[0].startswith(f"error: rank 1: no prepared dataset in {data_dir}/not-on-this-node"), errors
    assert not os.path.exists(tmp_path / "out" / "last.pt")


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory):
    """A 2-process run (--grad-accum 1) that SIGTERM to rank 1 alone stopped; (folder, step, output)."""
    out_dir = tmp_path_factory.mktemp("stopped")
    proc = torchrun(data_dir, out_dir, "--max-steps", "100000", "--eval-interval", "100000")
    wait_for(proc, lambda: len(log_lines(out_dir)) >= 2, "training steps")
    os.kill(rank_pid(proc, 1), signal.SIGTERM)
    returncode, out = finish(proc)
    assert returncode != 0, out[-3000:]  # torchrun passes the ranks' 143 on as a failure
    step = torch.load(out_dir / "last.pt", weights_only=True)["step"]
    assert step >= 2 and out.count(f"stopped by SIGTERM at step {step}; saved") == 1, out[-3000:]
    assert "the signal reached rank 1" in out  # rank 0 says who was stopped from outside
    assert {r["step"] for r in log_lines(out_dir) if "loss" in r} == set(range(1, step + 1))  # every rank stopped there
    return out_dir, step, out


def test_sigterm_to_one_rank_stops_all_and_resume_equals_a_run_never_stopped(data_dir, tmp_path, stopped):
    out_dir, step, _ = stopped
    resumed = tmp_path / "resumed"
    shutil.copytree(out_dir, resumed)
    returncode, out = finish(torchrun(data_dir, resumed, "--max-steps", str(step + 2), "--resume"))
    assert returncode == 0 and f"resuming from {resumed}/last.pt at step {step}" in out, out[-3000:]
    one_process(data_dir, tmp_path / "straight", "--grad-accum", "2", "--max-steps", str(step + 2))
    assert_same_training(resumed, tmp_path / "straight")


def test_resume_on_another_world_size_is_exact_or_refused(data_dir, tmp_path, stopped, capsys):
    """One process continues the 2 x 1 run exactly with --grad-accum 2; with --grad-accum 1 it
    would read other micro-batches per step, and it refuses in one line saying what to pass."""
    out_dir, step, _ = stopped
    resumed = tmp_path / "resumed"
    shutil.copytree(out_dir, resumed)
    with pytest.raises(SystemExit) as e:
        one_process(data_dir, resumed, "--max-steps", str(step + 2), "--resume")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "2 process(es) x --grad-accum 1 = 2 micro-batches" in err and "pass --grad-accum 2 --batch-size 4" in err
    one_process(data_dir, resumed, "--grad-accum", "2", "--max-steps", str(step + 2), "--resume")
    one_process(data_dir, tmp_path / "straight", "--grad-accum", "2", "--max-steps", str(step + 2))
    assert_same_training(resumed, tmp_path / "straight")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_ends_the_job_nonzero_and_the_last_checkpoint_loads(data_dir, tmp_path, rank):
    """SIGKILL to one rank while rank 0 writes a checkpoint at every step (rank 0 is killed in the
    middle of writing one): the job ends non-zero, and last.pt is whole and resumes."""
    out_dir, wide = tmp_path / "killed", ["--n-embd", "256", "--eval-interval", "1"]
    proc = torchrun(data_dir, out_dir, *wide, "--max-steps", "100000")
    wait_for(proc, lambda: len(log_lines(out_dir)) >= 6, "checkpoints")
    if rank == 0:
        wait_for(proc, lambda: writing_checkpoint(rank_pid(proc, 0), out_dir), "checkpoint write", poll=0.001)
    os.kill(rank_pid(proc, rank), signal.SIGKILL)
    returncode, out = finish(proc)
    assert returncode != 0, out[-3000:]
    if rank == 1:  # rank 0, stopped by torchrun, finishes the file it writes
        assert sorted(os.listdir(out_dir)) == ["best.pt", "last.pt", "log.jsonl"]
    assert load_checkpoint(str(out_dir / "best.pt"))[1]["step"] > 0
    step = load_checkpoint(str(out_dir / "last.pt"))[1]["step"]
    one_process(data_dir, out_dir, *wide, "--grad-accum", "2", "--max-steps", str(step + 1), "--resume")
    assert torch.load(out_dir / "last.pt", weights_only=True)["step"] == step + 1


def test_bench_torchrun_prints_plain_and_torchrun_side_by_side(data_dir, capsys):
    from tools import bench_torchrun
    flags = ["--rounds", "1", "--steps", "4", "--skip", "1", "--", "--data", data_dir, *TINY]
    assert bench_torchrun.main(flags) == 0
    out = capsys.readouterr().out
    assert out.count("| cpu float32") == 1 and out.count("| cpu x 1 process float32") == 1  # what train.py said
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("python train.py", "torchrun"))}
    assert rows["python"][2] == "1" and float(rows["python"][3].replace(",", "")) > 0  # processes, tokens/s
    assert rows["torchrun"][1] == "1" and float(rows["torchrun"][2].replace(",", "")) > 0
    assert float(rows["torchrun"][-1]) > 0  # its ratio to plain
    args = bench_torchrun.get_args(["--", "--data", data_dir, "--n-embd", "30"])
    assert bench_torchrun.tokens_per_s(0, args) == (None, "error: n_embd 30 is not divisible by n_head 4; "
                                                         "see python train.py --help")  # train.py's own line
