"""The GPU path as far as a CPU can check it: what torch.compile sees (graphs, breaks,
compilations across lengths), the flex tiles chosen per GPU, bf16 only where native, and
the flex engine's gradients on CUDA (skipped here)."""
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import attention
import engines
import model as model_module
from attention import VARIANTS, AttentionArgs, document_ids
from common import settings
from engines import flex
from engines.flex import flex_kernel_options
from model import GPT, GPTConfig, attend
from tools import selfcheck

EOT = 0


def tiny(name, engine, **overrides):
    torch.manual_seed(0)
    config = dict(attention=name, engine=engine, n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32,
                  attn_block=64)
    return GPT(GPTConfig(**(config | overrides)))


def batch(T, B=2):
    idx = torch.randint(1, 64, (B, T))
    idx[:, T // 3] = EOT  # two documents per row
    return idx, document_ids(idx, EOT)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_flex_forward_is_one_graph(name):
    """The block mask is built once per forward from tensors, so dynamo traces the whole model."""
    model = tiny(name, "flex").eval()
    idx, doc = batch(200)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(idx, doc=doc, logits_at=torch.arange(200))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def assert_one_graph_with_eager_gradients(model, T):
    """A training forward traces to one graph, and the compiled step's gradients equal eager ones."""
    idx, doc = batch(T)
    explained = torch._dynamo.explain(model)(idx, idx, doc=doc)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # forward and backward graphs, no C++ compiler needed
    grads = []
    for m in (model, torch.compile(model, backend=counter)):
        model.zero_grad()
        m(idx, idx, doc=doc)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert counter.frame_count == 1
    for eager, compiled in zip(*grads):
        assert torch.allclose(eager, compiled, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("engine", ["sdpa", "chunked"])
def test_cpu_training_step_is_one_graph_with_eager_gradients(name, engine):
    assert_one_graph_with_eager_gradients(tiny(name, engine), 130)


def test_exact_prior_gradient_route_compiles_to_one_graph():
    """prior_grad.py's route (forward-mode derivative tables, the extra pass, the zero with a
    gradient) traces whole, and its compiled gradients equal the eager ones."""
    assert_one_graph_with_eager_gradients(tiny("bam", "chunked", prior_grad="passes", attn_block=32), 70)


def test_exact_prior_gradient_route_on_flex_is_one_graph():
    """The flex side of the route (lse, GQA-stacked heads, captured detached tables) traces whole.
    q, k, v and the SSMax scale carry no gradient here (flex has no backward on a CPU); the prior's
    parameters do."""
    from engines.prior_grad import attend_exact, derivative_tables
    torch.manual_seed(0)
    variant = VARIANTS["bam"](GPTConfig(n_head=2, n_embd=32))
    q, k, v = (torch.randn(2, 2, 200, 16) for _ in range(3))
    _, doc = batch(200)
    scale = torch.ones(2)

    def attend_with_route(q, k, v, doc):
        ssmax = attention.ssmax_factor(scale, 2, 200, 0, doc)
        derivatives = derivative_tables(variant, 2, 200, "cpu")
        return attend_exact(q, k, v, variant, variant(200, "cpu"), derivatives, ssmax, doc, "flex", 64, None)

    explained = torch._dynamo.explain(attend_with_route)(q, k, v, doc)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("engine", ["flex", "sdpa"])
def test_few_compilations_across_lengths(name, engine):
    """Evaluation at 6 lengths compiles twice (static, then dynamic), never reaching the recompile
    limit after which flex falls back to eager T x T scores."""
    torch._dynamo.reset()
    model = tiny(name, engine).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for T in (64, 130, 200, 333, 517, 777):
            idx, doc = batch(T, B=1)
            got = compiled(idx, doc=doc, logits_at=torch.tensor([0, T - 1]))[0]
            assert torch.allclose(got, model(idx, doc=doc, logits_at=torch.tensor([0, T - 1]))[0], atol=1e-5)
    assert counter.frame_count <= 2 < torch._dynamo.config.recompile_limit
    assert not [w for w in caught if "without torch.compile" in str(w.message)]


def test_materialize_is_an_identity_with_gradients():
    """The copy that keeps flex's captured tables in memory under torch.compile passes values and
    gradients through unchanged, eagerly and compiled."""
    x = torch.randn(3, 5, requires_grad=True)
    weights = torch.randn(3, 5)
    for fn in (flex.materialize, torch.compile(flex.materialize, backend="aot_eager")):
        y = fn(x)
        (grad,) = torch.autograd.grad((y * weights).sum(), x)
        assert torch.equal(y, x) and torch.equal(grad, weights)


def listed_blocks(counts, indices):
    """(B, 1, n_q) counts and (B, 1, n_q, n_k) indices -> (B, n_q, n_k) bools."""
    B, _, n_q, n_k = indices.shape
    listed = torch.zeros(B, n_q, n_k, dtype=torch.bool)
    for b in range(B):
        for i in range(n_q):
            listed[b, i, indices[b, 0, i, :counts[b, 0, i]].long()] = True
    return listed


@pytest.mark.parametrize("Tq,Tk,use_doc", [(1, 1, False), (200, 333, True), (333, 333, True), (256, 256, False),
                                            (1, 700, True), (130, 1000, False), (1000, 1000, True)])
def test_flex_block_mask_lists_exactly_the_visible_blocks(Tq, Tk, use_doc):
    """Eager flex (the CPU reference) applies the mask to every score, so the block lists are
    checked here directly: a key block is listed iff some query of the block sees some key of it,
    and 'full' (the mask skipped) only where every query sees every key."""
    B, q_offset, n = 2, Tk - Tq, flex.FLEX_BLOCK
    doc = torch.sort(torch.randint(0, 3, (B, Tk)), dim=1).values if use_doc else None  # long documents
    mask = flex.flex_block_mask(B, Tq, Tk, q_offset, doc, torch.device("cpu"))
    i, j = torch.arange(Tq)[:, None] + q_offset, torch.arange(Tk)[None, :]
    allowed = (i >= j).expand(B, Tq, Tk)
    if use_doc:
        allowed = allowed & (doc[:, i] == doc[:, None, :])
    n_q, n_k = -(-Tq // n), -(-Tk // n)
    padded = torch.zeros(B, n_q * n, n_k * n, dtype=torch.bool)
    padded[:, :Tq, :Tk] = allowed
    inside = torch.zeros_like(padded)
    inside[:, :Tq, :Tk] = True
    tiles = lambda m: m.view(B, n_q, n, n_k, n).transpose(2, 3).flatten(3)  # noqa: E731 (B, n_q, n_k, n*n)
    some = tiles(padded).any(-1)
    every = (tiles(padded) | ~tiles(inside)).all(-1) & tiles(inside).any(-1)
    partial = listed_blocks(mask.kv_num_blocks, mask.kv_indices)
    full = listed_blocks(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert not (partial & full).any()
    partial, full = partial.expand_as(some), full.expand_as(some)  # no documents: one row serves all
    assert torch.equal(partial | full, some)
    assert not (full & ~every).any()  # a full block never hides a masked score
    assert Tk % n or torch.equal(full, every)  # and every such block is full


def fake_cuda_q(dtype_bytes, head_size, T=1024):
    return types.SimpleNamespace(device=torch.device("cuda"), shape=(1, 1, T, head_size),
                                 element_size=lambda: dtype_bytes)


@pytest.mark.parametrize("shared_kb", [99, 163, 227])
@pytest.mark.parametrize("dtype_bytes,head_size", [(2, 64), (2, 128), (4, 64), (4, 128)])
def test_flex_tiles_fit_the_gpu(monkeypatch, shared_kb, dtype_bytes, head_size):
    props = types.SimpleNamespace(shared_memory_per_block_optin=shared_kb * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    options = flex_kernel_options(fake_cuda_q(dtype_bytes, head_size))
    fwd_tiles = dtype_bytes * head_size * (options["fwd_BLOCK_M"] + 2 * options["fwd_num_stages"] * options["fwd_BLOCK_N"])
    assert fwd_tiles <= 64 * 1024 if shared_kb < 200 else fwd_tiles <= 128 * 1024  # q + pipelined k, v tiles
    assert 128 % options["fwd_BLOCK_M"] == 0 and 128 % options["fwd_BLOCK_N"] == 0  # the sparse block
    if dtype_bytes == 4:
        assert not [k for k in options if k.startswith("bwd_")]  # torch's float32 backward tiles
    else:
        assert options["bwd_BLOCK_N1"] % options["bwd_BLOCK_M1"] == 0
        assert options["bwd_BLOCK_M2"] % options["bwd_BLOCK_N2"] == 0
    assert flex_kernel_options(fake_cuda_q(dtype_bytes, head_size, T=1)) is None  # decoding: torch's tiles


def test_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert settings.native_bf16() is native


def test_qk_norm_keeps_the_dtype_of_v(monkeypatch):
    """Under CUDA autocast rms_norm returns float32; q and k must reach the kernel as v's dtype."""
    rms_norm = F.rms_norm  # weightless calls are the q, k norms; the blocks' nn.RMSNorm passes weights

    def float32_norm(x, shape, *weight_and_eps):
        return rms_norm(x if weight_and_eps else x.float(), shape, *weight_and_eps)
    monkeypatch.setattr(F, "rms_norm", float32_norm)
    seen = []
    real_attend = model_module.attend
    monkeypatch.setattr(model_module, "attend", lambda q, k, v, *a, **kw: seen.append((q.dtype, k.dtype, v.dtype))
                        or real_attend(q, k, v, *a, **kw))
    model = tiny("alibi", "sdpa", qk_norm=True).to(torch.bfloat16)
    model(torch.randint(1, 64, (1, 16)))
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_flex_gradients_match_sdpa_on_cuda(name):
    for T in selfcheck.LENGTHS:
        error = selfcheck.attention_case(name, "flex", T, 64, torch.float32, torch.device("cuda"), backward=True)
        assert error < selfcheck.TOLERANCE[torch.float32], (name, T, error)


def test_self_check_runs_on_the_cpu_and_refuses_bad_flags(capsys):
    assert selfcheck.main(["--device", "cpu", "--variants", "bam,scaleinv", "--checks", "engines,decode"]) == 0
    out = capsys.readouterr().out
    # the exact route where the model takes it (bam, 2 head sizes), not for scaleinv, which is not additive
    assert "12 passed, 0 failed" in out and out.count("chunked+passes float32") == 2
    assert "scaleinv  chunked+passes" not in out
    for bad in (["--checks", "speed"], ["--variants", "rope"], ["--device", "gpu0"]):
        with pytest.raises(SystemExit) as exit_info:
            selfcheck.main(bad)
        assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_flex_copies_what_it_captures_only_off_cuda(monkeypatch):
    """materialize (a copy of each table and SSMax factor per layer) serves CPU Inductor's flex lowering;
    on CUDA the tensors go to flex as they are. Every tensor the flex paths capture goes through
    flex_capture, which copies off CUDA only (a CUDA tensor faked on the CPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from engines import prior_grad
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside a compiled model
    copies = []
    monkeypatch.setattr(flex, "materialize", lambda t: copies.append(t) or t)
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_cuda = torch.empty(3, device="cuda")
        assert flex.flex_capture(on_cuda) is on_cuda and not copies
    assert flex.flex_capture(torch.ones(3)) is not None and len(copies) == 1

    captured = []
    for module in (engines, prior_grad):  # no direct copy: only through flex_capture
        monkeypatch.setattr(module, "flex_capture", lambda t: captured.append(t) or t)
        monkeypatch.setattr(module, "flex_engine", lambda q, k, v, *a, return_lse=False, **kw: (
            (v.new_zeros(q.shape), q.new_zeros(q.shape[:-1])) if return_lse else v.new_zeros(q.shape)))
    variant = VARIANTS["bam"](GPTConfig(n_head=2, n_embd=32))
    q = torch.randn(1, 2, 200, 16)
    c = attention.ssmax_factor(torch.ones(2, requires_grad=True), 1, 200, 0, None)
    attend(q, q, q, AttentionArgs(variant, variant(200, "cpu"), engine="flex"), ssmax=c)
    prior_grad.attend_exact(q, q, q, variant, variant(200, "cpu"), prior_grad.derivative_tables(variant, 2, 200, "cpu"),
                            c, None, "flex", 64, None)
    assert len(copies) == 1 and len(captured) == 5  # the table and c twice, the route's log r once
