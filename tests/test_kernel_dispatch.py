"""engine/kernels/dispatch.py: backend selection, and every backend against the reference kernel.

CPU: ``select_backend`` and the ``MESHTRON_ATTN_BACKEND`` override; ``forward``/``backward`` equal
the reference bitwise; the flash plumbing (flash-attn 2.6 and 2.7+ signatures, torch's aten op
schema, lse +inf/-inf normalisation) driven through stand-in kernels that call the reference.

GPU (skipped without CUDA): each available backend in bf16, varlen GQA 8:2 and 4:1, causal and
not, uneven documents, len_q != len_k (rows that see no key included), against the reference run
on fp32 upcasts of the same bf16 values: ``max|got - ref| / max|ref| <= 2e-2`` for out, lse (finite
entries; -inf entries must coincide), dq, dk, dv.
"""
from __future__ import annotations

import pytest
import torch

from engine.kernels import dispatch
from engine.kernels.attention import attention_backward, attention_forward

ENV = dispatch.ENV_VAR
TOL_BF16 = 2e-2
def needs_cuda(fn):
    """A test of the CUDA paths: marked ``cuda`` (tools/gpu_check.sh) and skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


# -- helpers -----------------------------------------------------------------------------------
def cu(lengths, device="cpu"):
    return torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)


def make(lens_q, lens_k, heads, groups, dim=64, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads, dim, generator=g)
    k = torch.randn(sum(lens_k), groups, dim, generator=g)
    v = torch.randn(sum(lens_k), groups, dim, generator=g)
    dout = torch.randn(sum(lens_q), heads, dim, generator=g)
    q, k, v, dout = (t.to(device=device, dtype=dtype) for t in (q, k, v, dout))
    return q, k, v, dout, cu(lens_q, device), cu(lens_k, device)


def run_both(q, k, v, dout, cu_q, cu_k, causal, fn_fwd, fn_bwd, **kw):
    out, lse = fn_fwd(q, k, v, cu_q, cu_k, causal=causal, **kw)
    return (out, lse), fn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, **kw)


def assert_same(got, ref):
    (out, lse), grads = got
    (r_out, r_lse), r_grads = ref
    assert torch.equal(out, r_out) and torch.equal(lse, r_lse)
    for g, r in zip(grads, r_grads):
        assert g.dtype == r.dtype and torch.equal(g, r)


LENS = {  # name: (lens_q, lens_k)
    "uneven": ([1, 37, 128, 300, 7], [1, 37, 128, 300, 7]),
    "q_suffix": ([20, 200, 3, 65], [64, 200, 9, 130]),  # len_q <= len_k
    "k_prefix": ([50, 129, 4], [30, 100, 4]),  # len_q > len_k: causal rows that see no key
}


# -- selection ---------------------------------------------------------------------------------
def test_cpu_tensors_select_reference(monkeypatch):
    q = torch.zeros(3, 2, 16)
    monkeypatch.delenv(ENV, raising=False)
    assert dispatch.select_backend(q) == "reference"
    assert dispatch.available_backends(q) == ["reference"]
    for value in ("auto", " AUTO ", "", "reference", "Reference"):
        monkeypatch.setenv(ENV, value)
        assert dispatch.select_backend(q) == "reference"
    # bf16 on CPU is still not a flash case
    assert dispatch.select_backend(q.bfloat16()) == "reference"


def test_unknown_backend_is_a_value_error(monkeypatch):
    monkeypatch.setenv(ENV, "flash3")
    q = torch.zeros(3, 2, 16)
    with pytest.raises(ValueError, match=ENV) as err:
        dispatch.select_backend(q)
    for choice in dispatch.CHOICES:
        assert choice in str(err.value)
    with pytest.raises(ValueError, match=ENV):
        dispatch.forward(q, q[:, :1], q[:, :1], cu([3]), cu([3]))


@pytest.mark.parametrize("backend", ["flash_attn", "torch_flash"])
def test_forced_flash_backend_on_cpu_is_a_runtime_error(monkeypatch, backend):
    monkeypatch.setenv(ENV, backend)
    with pytest.raises(RuntimeError, match=f"{ENV}={backend} cannot run here.*CUDA"):
        dispatch.select_backend(torch.zeros(3, 2, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads,groups", [(8, 2), (4, 1)], ids=["gqa8:2", "gqa4:1"])
@pytest.mark.parametrize("case", list(LENS))
@pytest.mark.parametrize("env", [None, "reference"])
def test_cpu_equals_reference_exactly(monkeypatch, env, case, heads, groups, causal):
    if env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, env)
    q, k, v, dout, cu_q, cu_k = make(*LENS[case], heads, groups, dim=16, seed=heads + groups)
    got = run_both(q, k, v, dout, cu_q, cu_k, causal, dispatch.forward, dispatch.backward)
    ref = run_both(q, k, v, dout, cu_q, cu_k, causal, attention_forward, attention_backward)
    assert_same(got, ref)


# -- flash plumbing on CPU, through stand-in kernels -------------------------------------------
def _kernel_lse(lse):
    """What the flash kernels return for rows with no visible key: lse +inf (out is 0)."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _check_call(q, cu_q, cu_k, max_q, max_k, scale):
    assert cu_q.dtype == cu_k.dtype == torch.int32 and q.is_contiguous()
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    assert isinstance(scale, float)


def fa26_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax,
                 block_table, leftpad_k=None, seqused_k=None):
    assert (dropout_p, window_size, softcap, alibi_slopes, return_softmax, block_table) == (
        0.0, (-1, -1), 0.0, None, False, None)
    _check_call(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    out, lse = attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                 scale=softmax_scale)
    return out, q, k, v, out, _kernel_lse(lse), None, None


def fa26_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                  max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                  softcap, alibi_slopes, deterministic, rng_state=None):
    assert (dropout_p, window_size, softcap, alibi_slopes, rng_state) == (0.0, (-1, -1), 0.0, None, None)
    assert not torch.isneginf(softmax_lse).any(), "the kernel must get +inf, not -inf"
    grads = attention_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                               causal=causal, scale=softmax_scale)
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(g)
    return dq, dk, dv, None


@torch.library.custom_op("meshtron_test::fa27_forward", mutates_args=())
def fa27_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                 dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int = -1,
                 window_size_right: int = -1, softcap: float = 0.0,
                 alibi_slopes: torch.Tensor | None = None, return_softmax: bool = False,
                 block_table: torch.Tensor | None = None, leftpad_k: torch.Tensor | None = None,
                 seqused_k: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    assert (window_size_left, window_size_right) == (-1, -1) and dropout_p == 0.0
    out, lse = attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                 scale=softmax_scale)
    return out, _kernel_lse(lse), torch.empty(0), torch.empty(2, dtype=torch.int64)


@torch.library.custom_op("meshtron_test::fa27_backward", mutates_args=("dq", "dk", "dv"))
def fa27_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, softmax_lse: torch.Tensor, dq: torch.Tensor | None,
                  dk: torch.Tensor | None, dv: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                  dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
                  window_size_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                  deterministic: bool, rng_state: torch.Tensor | None = None) -> torch.Tensor:
    assert not torch.isneginf(softmax_lse).any(), "the kernel must get +inf, not -inf"
    grads = attention_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                               causal=causal, scale=softmax_scale)
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(g)
    return torch.empty(0)


def aten_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                 return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                 seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
    assert dropout_p == 0.0 and return_debug_mask is False
    _check_call(query, cum_seq_q, cum_seq_k, max_q, max_k, scale)
    out, lse = attention_forward(query, key, value, cum_seq_q, cum_seq_k, causal=is_causal, scale=scale)
    return out, _kernel_lse(lse), torch.empty(2), torch.empty(()), torch.empty(0)


def aten_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                  dropout_p, is_causal, philox_seed, philox_offset, *, scale=None,
                  window_size_left=None, window_size_right=None):
    assert not torch.isneginf(logsumexp).any(), "the kernel must get +inf, not -inf"
    return attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                              causal=is_causal, scale=scale)


FAKES = {
    "fa2.6": ("flash_attn", (fa26_forward, fa26_backward)),
    "fa2.7": ("flash_attn", (fa27_forward, fa27_backward)),
    "aten": ("torch_flash", (aten_forward, aten_backward)),
}


@pytest.mark.parametrize("fake", list(FAKES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_flash_plumbing_with_stand_in_kernels(monkeypatch, fake, causal):
    backend, (fwd, bwd) = FAKES[fake]
    monkeypatch.setattr(dispatch, "_flash_unsupported", lambda q: None)
    monkeypatch.setattr(dispatch, "_available", lambda name: True)
    monkeypatch.setattr(dispatch, "_flash_attn", lambda: (fwd, bwd, dispatch._version_kwargs(fwd),
                                                          dispatch._version_kwargs(bwd)))
    monkeypatch.setattr(dispatch, "_torch_flash_ops", lambda: (fwd, bwd))
    monkeypatch.setenv(ENV, backend)
    q, k, v, dout, cu_q, cu_k = make(*LENS["k_prefix"], 8, 2, dim=16, seed=5)
    got = run_both(q, k, v, dout, cu_q, cu_k, causal, dispatch.forward, dispatch.backward)
    ref = run_both(q, k, v, dout, cu_q, cu_k, causal, attention_forward, attention_backward)
    assert_same(got, ref)
    if causal:  # the stand-ins returned +inf for the 20 + 29 rows that see no key
        assert torch.isneginf(got[0][1]).sum() == 8 * 49


def test_version_kwargs():
    assert dispatch._version_kwargs(fa26_forward) == {
        "window_size": (-1, -1), "softcap": 0.0, "alibi_slopes": None, "return_softmax": False,
        "block_table": None}
    assert dispatch._version_kwargs(fa27_backward) == {
        "window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
        "deterministic": False, "rng_state": None}


def test_torch_flash_call_matches_the_installed_aten_schema():
    """The real aten ops on meta tensors: the call binds and the varlen lse is [H, total_q]."""
    q, k, v, dout, cu_q, cu_k = make([5, 9], [7, 3], 8, 2, dtype=torch.bfloat16, device="meta")
    out, lse = dispatch._tf_forward(q, k, v, cu_q, cu_k, 9, 7, True, 0.125)
    assert out.shape == q.shape and lse.shape == (8, 14) and lse.dtype == torch.float32
    dq, dk, dv = dispatch._tf_backward(dout, q, k, v, out, lse, cu_q, cu_k, 9, 7, True, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


# -- GPU: every available backend against the fp32 reference -----------------------------------
def rel_err(got, ref):
    got, ref = got.double().cpu(), ref.double().cpu()
    denom = ref.abs().max().item()
    return (got - ref).abs().max().item() / (denom if denom > 0 else 1.0)


def check_gpu(backend, lens_q, lens_k, heads, groups, causal, dim=64, **kw):
    probe = torch.empty(1, heads, dim, device="cuda", dtype=torch.bfloat16)
    if backend not in dispatch.available_backends(probe):
        pytest.skip(f"{backend} is not available on this machine")
    q, k, v, dout, cu_q, cu_k = make(lens_q, lens_k, heads, groups, dim, seed=heads * 10 + groups,
                                     dtype=torch.bfloat16, device="cuda")
    assert dispatch.select_backend(q) == backend
    (out, lse), grads = run_both(q, k, v, dout, cu_q, cu_k, causal, dispatch.forward,
                                 dispatch.backward, **kw)
    up = [t.float().cpu() for t in (q, k, v, dout)]
    (r_out, r_lse), r_grads = run_both(*up, cu_q.cpu(), cu_k.cpu(), causal, attention_forward,
                                       attention_backward, **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert lse.shape == (heads, q.shape[0])
    dead = torch.isneginf(r_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), dead), "lse is -inf exactly where no key is seen"
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any()
    assert torch.equal(out.cpu()[dead.T], torch.zeros_like(r_out[dead.T])), "out 0 where no key"
    assert rel_err(out, r_out) <= TOL_BF16, ("out", rel_err(out, r_out))
    if (~dead).any():
        assert rel_err(lse.cpu()[~dead], r_lse[~dead]) <= TOL_BF16
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, r_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape and torch.isfinite(g).all(), name
        assert rel_err(g, r) <= TOL_BF16, (name, rel_err(g, r))


@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads,groups", [(8, 2), (4, 1)], ids=["gqa8:2", "gqa4:1"])
@pytest.mark.parametrize("case", list(LENS))
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_gpu_backend_matches_reference(monkeypatch, backend, case, heads, groups, causal):
    monkeypatch.setenv(ENV, backend)
    check_gpu(backend, *LENS[case], heads, groups, causal)


@needs_cuda
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_gpu_scale_head_dim_and_explicit_max_lengths(monkeypatch, backend):
    monkeypatch.setenv(ENV, backend)
    lens_q, lens_k = [33, 250, 2], [60, 250, 2]
    check_gpu(backend, lens_q, lens_k, 8, 2, True, dim=128, scale=0.3, max_q=250, max_k=250)


@needs_cuda
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_gpu_document_without_keys(monkeypatch, backend):
    monkeypatch.setenv(ENV, backend)
    check_gpu(backend, [16, 8, 5], [16, 0, 5], 4, 1, False)


@needs_cuda
def test_gpu_auto_prefers_a_flash_kernel(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    q = torch.empty(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    assert dispatch.select_backend(q) == dispatch.available_backends(q)[0]
    assert dispatch.select_backend(q.float()) == "reference"
    assert dispatch.select_backend(q[..., :60]) == "reference"  # head dim not a multiple of 8
