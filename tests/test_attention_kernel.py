"""engine/kernels/attention.py: the local attention contract (DESIGN §6) against a naive reference.

The reference works document by document in float64: K/V expanded to every query head with
``repeat_interleave`` (query head h uses KV head h // (H/G)), full score matrix, mask (causal
aligned bottom-right when len_q != len_k), softmax, output; lse = logsumexp of the visible scores;
a query row that sees no key gets out 0 and lse -inf. Its gradients come from torch.autograd.

Tolerance: fp32 inputs must match with ``max|got - ref| / max|ref| <= 1e-5`` for out, lse (finite
entries; the -inf entries must coincide exactly), dq, dk and dv; bf16 inputs must give bf16
outputs within ``2e-2`` of the float64 reference computed from the same (bf16-rounded) values.
"""
from __future__ import annotations

import pytest
import torch

from engine.kernels.attention import attention_backward, attention_forward, local_attention

TOL_FP32 = 1e-5
TOL_BF16 = 2e-2
DOCS = [1, 2, 3, 17, 64, 1100]  # 1100 spans several of the reference's query blocks
DOCS_SHORT = [1, 2, 3, 17, 64, 300]  # same shapes, cheaper: used where 1100 adds nothing new


# -- helpers -----------------------------------------------------------------------------------
def cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0).to(torch.int32)


def rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def make_qkv(lens_q, lens_k, heads, groups, dim, seed=0, dtype=torch.float32):
    q = rand((sum(lens_q), heads, dim), seed, dtype)
    k = rand((sum(lens_k), groups, dim), seed + 1, dtype)
    v = rand((sum(lens_k), groups, dim), seed + 2, dtype)
    return q, k, v, cu(lens_q), cu(lens_k)


def reference(q, k, v, cu_q, cu_k, causal=True, scale=None):
    """Naive float64 attention, differentiable in q, k, v: ``(out [Tq,H,D], lse [H,Tq])``."""
    heads, groups = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qd = q[cq[i]:cq[i + 1]].double()
        kd = k[ck[i]:ck[i + 1]].double().repeat_interleave(heads // groups, dim=1)
        vd = v[ck[i]:ck[i + 1]].double().repeat_interleave(heads // groups, dim=1)
        n, m = qd.shape[0], kd.shape[0]
        s = torch.einsum("qhd,khd->hqk", qd, kd) * scale  # [H, n, m]
        visible = torch.ones(n, m, dtype=torch.bool)
        if causal:  # bottom-right: query j of n sees keys up to m - n + j
            visible = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
        if m:
            mx = s.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True)
        else:
            mx = s.new_zeros(heads, n, 1)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)).detach()
        e = torch.exp(s - mx) * visible  # exact zeros (and zero gradients) where masked
        den = e.sum(-1, keepdim=True)
        seen = den > 0
        safe = torch.where(seen, den, torch.ones_like(den))
        outs.append(torch.einsum("hqk,khd->qhd", e / safe, vd))
        lses.append(torch.where(seen, mx + torch.log(safe), torch.full_like(den, float("-inf"))).squeeze(-1))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def reference_grads(q, k, v, cu_q, cu_k, dout, causal=True, scale=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference(*leaves, cu_q, cu_k, causal, scale)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), lse.detach(), grads


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    denom = ref.abs().max().item()
    return (got - ref).abs().max().item() / (denom if denom > 0 else 1.0)


def assert_close(got, ref, tol, what):
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = rel_err(got, ref)
    assert err <= tol, f"{what}: max|got-ref|/max|ref| = {err:.3g} > {tol:g}"


def assert_lse_close(got, ref, tol):
    assert got.dtype == torch.float32 and got.shape == ref.shape
    dead = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(got), dead), "lse is -inf exactly where a row sees no key"
    assert not torch.isnan(got).any() and not torch.isposinf(got).any()
    if (~dead).any():
        assert_close(got[~dead], ref[~dead], tol, "lse")


def check_all(q, k, v, cu_q, cu_k, causal, scale=None, tol=TOL_FP32, seed=7):
    """Forward, backward-given-(out, lse) and (for self-attention) autograd against the reference."""
    dout = rand(q.shape, seed, q.dtype)
    ref_out, ref_lse, ref_g = reference_grads(q, k, v, cu_q, cu_k, dout, causal, scale)
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int((cu_k[1:] - cu_k[:-1]).max())
    out, lse = attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert lse.shape == (q.shape[1], q.shape[0])
    assert_close(out, ref_out, tol, "out")
    assert_lse_close(lse, ref_lse, tol)
    grads = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale)
    for name, g, r, x in zip("qkv", grads, ref_g, (q, k, v)):
        assert g.dtype == x.dtype
        assert_close(g, r, tol, f"d{name} (attention_backward)")
    if torch.equal(cu_q, cu_k):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out2 = local_attention(*leaves, cu_q, causal=causal, scale=scale)
        assert torch.equal(out2.detach(), out)
        out2.backward(dout)
        for name, x, r in zip("qkv", leaves, ref_g):
            assert_close(x.grad, r, tol, f"d{name} (local_attention autograd)")
    return out, lse, grads


# -- packed documents --------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 1), (8, 2)], ids=["mha", "gqa4:1", "gqa8:2"])
def test_packed_uneven_documents(heads, groups, dim, causal):
    # the long document (two query blocks) with head dim 16; head dim 64 on shorter ones (runtime)
    lens = DOCS if dim == 16 else DOCS_SHORT
    q, k, v, cu_q, cu_k = make_qkv(lens, lens, heads, groups, dim, seed=heads * 100 + groups * 10 + dim)
    check_all(q, k, v, cu_q, cu_k, causal)


def test_explicit_scale_and_document_order():
    lens = [17, 1, 64, 3]
    q, k, v, cu_q, cu_k = make_qkv(lens, lens, 4, 2, 16, seed=3)
    check_all(q, k, v, cu_q, cu_k, causal=True, scale=0.37)
    check_all(q, k, v, cu_q, cu_k, causal=False, scale=1.5)


def test_documents_do_not_attend_to_each_other():
    lens = [5, 9, 4]
    q, k, v, cu_q, cu_k = make_qkv(lens, lens, 2, 1, 16, seed=11)
    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=False)
    k2, v2 = k.clone(), v.clone()
    k2[5:14] += 3.0  # change only document 1's keys/values
    v2[5:14] -= 2.0
    out2, lse2 = attention_forward(q, k2, v2, cu_q, cu_k, causal=False)
    for sl in (slice(0, 5), slice(14, 18)):
        assert torch.equal(out[sl], out2[sl]) and torch.equal(lse[:, sl], lse2[:, sl])
    assert not torch.equal(out[5:14], out2[5:14])


# -- len_q != len_k ----------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_query_suffix_bottom_right(causal):
    """q = the last half of each document, k = the whole document."""
    lens_k = [2, 5, 17, 64, 1100]
    lens_q = [n - n // 2 for n in lens_k]
    heads, groups, dim = 8, 2, 16
    qf, k, v, cu_f, _ = make_qkv(lens_k, lens_k, heads, groups, dim, seed=21)
    keep = torch.cat([torch.arange(a + n // 2, a + n) for a, n in zip(cu_f[:-1].tolist(), lens_k)])
    q, cu_q, cu_k = qf[keep], cu(lens_q), cu(lens_k)
    out, lse, (dq, dk, dv) = check_all(q, k, v, cu_q, cu_k, causal)

    # and the same rows of the full self-attention, computed by the kernel itself
    out_f, lse_f = attention_forward(qf, k, v, cu_f, cu_f, causal=causal)
    assert_close(out, out_f[keep], TOL_FP32, "out vs full-document rows")
    assert_close(lse, lse_f[:, keep], TOL_FP32, "lse vs full-document rows")
    dout = rand(q.shape, 7)
    dout_f = torch.zeros_like(qf)
    dout_f[keep] = dout
    dq_f, dk_f, dv_f = attention_backward(dout_f, qf, k, v, out_f, lse_f, cu_f, cu_f, causal=causal)
    assert_close(dq, dq_f[keep], TOL_FP32, "dq vs full-document rows")
    assert_close(dk, dk_f, TOL_FP32, "dk vs full document")
    assert_close(dv, dv_f, TOL_FP32, "dv vs full document")


def test_key_prefix_non_causal_and_causal():
    """k = the first part of each document (len_q > len_k)."""
    lens_q, lens_k = [9, 40, 1030], [4, 40, 700]
    q, k, v, cu_q, cu_k = make_qkv(lens_q, lens_k, 4, 1, 16, seed=31)
    check_all(q, k, v, cu_q, cu_k, causal=False)
    check_all(q, k, v, cu_q, cu_k, causal=True)


def test_rows_that_see_no_key():
    """Causal with len_q > len_k: the first len_q - len_k rows of a document see nothing."""
    lens_q, lens_k = [5, 8, 1030, 3], [3, 8, 1000, 1]
    heads, groups = 4, 2
    q, k, v, cu_q, cu_k = make_qkv(lens_q, lens_k, heads, groups, 16, seed=41)
    out, lse, (dq, dk, dv) = check_all(q, k, v, cu_q, cu_k, causal=True)
    dead = torch.cat([torch.arange(a, a + nq - nk)
                      for a, nq, nk in zip(cu_q[:-1].tolist(), lens_q, lens_k)])
    assert dead.numel() == 2 + 30 + 2
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    assert torch.isneginf(lse[:, dead]).all()
    live = torch.ones(q.shape[0], dtype=torch.bool)
    live[dead] = False
    assert torch.isfinite(lse[:, live]).all()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[dead], torch.zeros_like(dq[dead]))


def test_document_with_no_keys():
    """A document with queries but no keys: every row sees no key -> out 0, lse -inf."""
    lens_q, lens_k = [4, 3], [4, 0]
    q, k, v, cu_q, cu_k = make_qkv(lens_q, lens_k, 2, 1, 16, seed=43)
    out, lse = attention_forward(q, k, v, cu_q, cu_k, causal=False)
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))
    assert torch.isneginf(lse[:, 4:]).all()


def test_documents_with_no_queries():
    lens_q, lens_k = [0, 5, 0], [3, 5, 2]
    q, k, v, cu_q, cu_k = make_qkv(lens_q, lens_k, 2, 1, 16, seed=44)
    _, _, (_, dk, dv) = check_all(q, k, v, cu_q, cu_k, causal=True)
    assert torch.equal(dk[:3], torch.zeros_like(dk[:3])) and torch.equal(dv[8:], torch.zeros_like(dv[8:]))


# -- merging partial attentions with lse (what ring attention relies on) ----------------------
def merge(parts):
    """``[(out_i [T,H,D], lse_i [H,T])] -> (out, lse)`` with out = Σ exp(lse_i - lse)·out_i."""
    lse = parts[0][1]
    for _, l in parts[1:]:
        lse = torch.logaddexp(lse, l)
    out = sum(torch.exp(l - lse).T.unsqueeze(-1) * o.float() for o, l in parts)
    return out, lse


@pytest.mark.parametrize("heads,groups", [(4, 4), (8, 2)], ids=["mha", "gqa8:2"])
def test_merge_two_key_halves(heads, groups):
    lens = [2, 7, 64, 301]
    split = [1, 3, 40, 150]  # keys [0, s) in part A, [s, n) in part B, per document
    q, k, v, cu_q, cu_k = make_qkv(lens, lens, heads, groups, 16, seed=51)
    starts = cu_k[:-1].tolist()
    idx_a = torch.cat([torch.arange(a, a + s) for a, s in zip(starts, split)])
    idx_b = torch.cat([torch.arange(a + s, a + n) for a, s, n in zip(starts, split, lens)])
    cu_a, cu_b = cu(split), cu([n - s for n, s in zip(lens, split)])

    out_full, lse_full = attention_forward(q, k, v, cu_q, cu_k, causal=False)
    out_a, lse_a = attention_forward(q, k[idx_a], v[idx_a], cu_q, cu_a, causal=False)
    out_b, lse_b = attention_forward(q, k[idx_b], v[idx_b], cu_q, cu_b, causal=False)
    out, lse = merge([(out_a, lse_a), (out_b, lse_b)])
    ref_out, ref_lse = reference(q, k, v, cu_q, cu_k, causal=False)
    assert_close(out, out_full, TOL_FP32, "merged out vs full forward")
    assert_close(lse, lse_full, TOL_FP32, "merged lse vs full forward")
    assert_close(out, ref_out, TOL_FP32, "merged out vs reference")
    assert_close(lse, ref_lse, TOL_FP32, "merged lse vs reference")

    dout = rand(q.shape, 52)
    dq_f, dk_f, dv_f = attention_backward(dout, q, k, v, out_full, lse_full, cu_q, cu_k, causal=False)
    dq_a, dk_a, dv_a = attention_backward(dout, q, k[idx_a], v[idx_a], out, lse, cu_q, cu_a, causal=False)
    dq_b, dk_b, dv_b = attention_backward(dout, q, k[idx_b], v[idx_b], out, lse, cu_q, cu_b, causal=False)
    assert_close(dq_a + dq_b, dq_f, TOL_FP32, "dq summed over key halves")
    dk, dv = torch.empty_like(dk_f), torch.empty_like(dv_f)
    dk[idx_a], dk[idx_b], dv[idx_a], dv[idx_b] = dk_a, dk_b, dv_a, dv_b
    assert_close(dk, dk_f, TOL_FP32, "dk of the key halves")
    assert_close(dv, dv_f, TOL_FP32, "dv of the key halves")
    _, _, ref_g = reference_grads(q, k, v, cu_q, cu_k, dout, causal=False)
    assert_close(dq_a + dq_b, ref_g[0], TOL_FP32, "merged dq vs reference")
    assert_close(dk, ref_g[1], TOL_FP32, "merged dk vs reference")
    assert_close(dv, ref_g[2], TOL_FP32, "merged dv vs reference")


# -- bf16 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bf16(causal):
    lens = [1, 3, 17, 64, 1100] if causal else DOCS_SHORT
    q, k, v, cu_q, cu_k = make_qkv(lens, lens, 8, 2, 64, seed=61, dtype=torch.bfloat16)
    out, lse, grads = check_all(q, k, v, cu_q, cu_k, causal, tol=TOL_BF16)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads)


# -- errors ----------------------------------------------------------------------------------
def test_mismatched_document_counts():
    q, k, v, _, _ = make_qkv([4, 4], [4, 4], 2, 1, 16)
    cu_q, cu_k = cu([4, 4]), cu([8])
    with pytest.raises(ValueError, match="documents"):
        attention_forward(q, k, v, cu_q, cu_k)
    out, lse = attention_forward(q, k, v, cu_q, cu_q)
    with pytest.raises(ValueError, match="documents"):
        attention_backward(torch.ones_like(out), q, k, v, out, lse, cu_q, cu_k)
    with pytest.raises(ValueError, match="documents"):
        attention_forward(q, k, v, cu([2, 2, 4]), cu_q)


def test_heads_not_multiple_of_kv_heads():
    q, k, v, cu_q, cu_k = make_qkv([4], [4], 3, 2, 16)
    with pytest.raises(ValueError, match="3 query heads"):
        attention_forward(q, k, v, cu_q, cu_k)
