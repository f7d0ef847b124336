"""bench.py --tiny end to end on CPU: every section, every variant, and the JSON it writes."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("nope", "alibi", "bam", "scaleinv")


def section_rows(stdout, section):
    """The variant names that start a row in one section of the output."""
    block = re.search(rf"^== {section}\b.*?(?=^== |\Z)", stdout, re.M | re.S).group(0)
    return [line.split()[0] for line in block.splitlines()[1:] if line.split() and line.split()[0] in VARIANTS]


def test_bench_tiny_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    # one thread: on a busy 2-core machine, two spinning OpenMP threads can be many times slower
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/bench.py", "--tiny", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    train, attn, long = (section_rows(proc.stdout, s) for s in ("train", "attn", "long"))
    assert train == list(VARIANTS)
    # 2 attention lengths x 3 engines (sdpa, flex forward only on CPU, chunked), 2 long lengths; bam
    # trains a prior and SSMax on chunked: a row for each --prior-grad route
    assert sorted(attn) == sorted(VARIANTS * 6 + ("bam",) * 2) and sorted(long) == sorted(VARIANTS * 2)
    assert "OOM" not in proc.stdout
    assert section_rows(proc.stdout, "summary") == list(VARIANTS)

    results = json.loads(out.read_text())
    assert [r["variant"] for r in results["train"]] == list(VARIANTS)  # sdpa on a CPU: one way for gradients
    for r in results["train"]:
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and r["prior_grad"] == "-"
    assert results["train"][0]["vs_nope"] == 1.0
    assert {(r["engine"], r["T"]) for r in results["attention"]} == {
        (e, T) for e in ("sdpa", "flex", "chunked") for T in (128, 256)}
    assert sorted((r["variant"], r["engine"], r["prior_grad"]) for r in results["attention"] if r["prior_grad"] != "-") \
        == [("bam", "chunked", "passes")] * 2 + [("bam", "chunked", "table")] * 2
    assert all(r["ms"] > 0 for r in results["attention"])
    assert all(r["seconds"] > 0 and r["peak_gb"] is None for r in results["long"])


def test_bench_quick_prints_one_pass_fail_table_on_cpu(tmp_path):
    out = tmp_path / "quick.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split()[:3] for line in proc.stdout.splitlines() if line.split()[:1] in (["engines"], ["train"])]
    # flex forward for every variant, the exact route where the model takes it (bam), a step each
    assert rows == [["engines", v, "flex"] for v in VARIANTS[:3]] + [["engines", "bam", "chunked+passes"],
                    ["engines", "scaleinv", "flex"]] + [["train", v, "grad"] for v in VARIANTS]
    assert "9 passed, 0 failed" in proc.stdout
    results = json.loads(out.read_text())["quick"]
    assert len(results) == 9 and all(r["ok"] for r in results)
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in results if r["check"] == "train")


def test_a_failing_cell_leaves_the_other_rows_and_the_json(tmp_path, monkeypatch, capsys):
    from tools import bench
    real = bench.bench_attention

    def fails_for_bam(name, *args):
        if name == "bam":
            raise RuntimeError("a lowering error\nwith more lines")
        return real(name, *args)

    monkeypatch.setattr(bench, "bench_attention", fails_for_bam)
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--device", "cpu", "--sections", "attn", "--variants", "nope,bam", "--steps", "1",
            "--warmup", "0", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 1
    rows = json.loads(out.read_text())["attention"]
    assert len(rows) == 2 * (3 + 4)  # 2 lengths: nope timed on 3 engines, bam the error on 3 (chunked: 2 routes)
    assert all(r["ms"] > 0 for r in rows if r["variant"] == "nope")
    assert all(r["error"] == "RuntimeError: a lowering error" for r in rows if r["variant"] == "bam")
    assert "error in a cell (bam, sdpa, 128): RuntimeError: a lowering error" in capsys.readouterr().out

    calls = []  # a run stopped mid-way keeps the rows it finished on disk

    def stopped_at_the_third_cell(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return dict(ms=1.0, mode="fwd")

    monkeypatch.setattr(bench, "bench_attention", stopped_at_the_third_cell)
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    assert len(json.loads(out.read_text())["attention"]) == 2


def test_bench_cpu_counts_the_attention_it_runs(tmp_path):
    """bench_cpu.py's attention FLOPs: causal q.k and p.v over the queries computed (all of them in
    every layer but the last, the last `queries` there); and its matmul-only run writes the JSON."""
    from tools import bench_cpu
    from model import GPTConfig
    config = GPTConfig(n_layer=3, n_head=2, n_embd=16)
    T, queries = 10, 4
    per_key = 2 * 2 * (16 // 2) * 2  # two matmuls, multiply-add, head size, heads
    want = per_key * (2 * sum(i + 1 for i in range(T)) + sum(i + 1 for i in range(T - queries, T)))
    assert bench_cpu.attention_flops(config, T, queries) == want
    assert bench_cpu.main(["--sections", "matmul", "--out", str(tmp_path / "cpu.json")]) == 0
    saved = json.loads((tmp_path / "cpu.json").read_text())
    assert saved["matmul_gflops"] > 0 and saved["train"] == [] and saved["long"] == []
