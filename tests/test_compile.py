"""The GPU path as far as a CPU can check it: what torch.compile sees (graphs, breaks,
compilations across lengths), the flex tiles chosen per GPU, bf16 only where native, and
the flex engine's gradients on CUDA (skipped here)."""
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import model as model_module
import selfcheck
from attention import VARIANTS, attend, document_ids, flex_kernel_options
from model import GPT, GPTConfig

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


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("engine", ["sdpa", "chunked"])
def test_cpu_training_step_is_one_graph_with_eager_gradients(name, engine):
    model = tiny(name, engine)
    idx, doc = batch(130)
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


def test_flex_block_mask_with_a_query_offset_and_documents():
    """Queries 133..332 of 333 keys (a KV cache longer than one block), documents masked."""
    var = VARIANTS["alibi"](GPTConfig(n_head=2))
    q, k, v = (torch.randn(2, 2, 333, 16) for _ in range(3))
    doc = torch.sort(torch.randint(0, 4, (2, 333)), dim=1).values
    tables = var.tables(333, "cpu")
    want = attend(q, k, v, var, tables, doc=doc, engine="sdpa")[:, :, 133:]
    got = attend(q[:, :, 133:], k, v, var, tables, doc=doc, q_offset=133, engine="flex")
    assert torch.allclose(got, want, atol=1e-5)


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
        assert model_module.native_bf16() is native


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


def test_self_check_runs_on_the_cpu():
    assert selfcheck.main(["--device", "cpu", "--variants", "bam", "--checks", "engines,decode"]) == 0
