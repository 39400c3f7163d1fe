"""Local (single-rank) variable-length attention with log-sum-exp: the kernel contract of DESIGN §6.

``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale) -> (out, lse)`` and
``backward(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``. Context-parallel modes call only this
contract, so a GPU kernel can replace the reference without touching them.

Legend: T tokens (documents packed back to back), H query heads, G KV heads (GQA groups), D head
dim. ``q_THD [Tq, H, D]``, ``k_TGD/v_TGD [Tk, G, D]``, ``out_THD [Tq, H, D]``, ``lse_HT [H, Tq]``
(fp32). Document i spans ``cu_seqlens[i]:cu_seqlens[i+1]`` in q and in k. With ``causal`` and
``len_q != len_k`` the mask is aligned bottom-right (query j of n sees keys up to
``len_k - n + j``), as flash-attn does; a query row that sees no key gets out 0, lse -inf.

The reference computes in fp32 (exact to fp32 round-off) and processes queries in blocks so the
score matrix of a long document never materialises whole.
"""
from __future__ import annotations

import torch

# query rows per block: the fp32 score block [heads, rows, keys] stays near 8 MiB, so it is reused
# from the allocator's cache instead of being mapped and faulted in afresh each time (which
# doubled the CPU cost at 1k-token documents)
_SCORE_BUDGET = 2**21


def _doc_spans(cu_q: torch.Tensor, cu_k: torch.Tensor):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq) - 1} documents but cu_seqlens_k has {len(ck) - 1}")
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _scores(q_blk, k_doc, scale, causal, q_off, len_q, len_k):
    """Scores ``[G, H/G, bq, Tk]`` in fp32 for one query block of one document, masked."""
    g = k_doc.shape[1]
    qg = q_blk.float().view(q_blk.shape[0], g, -1, q_blk.shape[-1])  # [bq, G, H/G, D]
    s = torch.einsum("qgad,kgd->gaqk", qg, k_doc.float()) * scale
    if causal:
        qpos = torch.arange(q_off, q_off + q_blk.shape[0], device=s.device) + (len_k - len_q)
        kpos = torch.arange(len_k, device=s.device)
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    return s


def _blocks(sq0, sq1, num_keys: int, num_heads: int):
    rows = max(16, min(1024, _SCORE_BUDGET // max(1, num_keys * num_heads)))
    for b0 in range(sq0, sq1, rows):
        yield b0, min(b0 + rows, sq1)


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None,
                      causal=True, scale=None):
    """Reference forward: ``(out_THD, lse_HT)``; see the module docstring."""
    num_heads, num_groups = q.shape[1], k.shape[1]
    if num_heads % num_groups:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_groups} KV heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    lse = torch.full((num_heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for sq0, sq1, sk0, sk1 in _doc_spans(cu_seqlens_q, cu_seqlens_k):
        if sk1 == sk0:  # no keys: out stays 0, lse -inf
            continue
        k_doc, v_doc = k[sk0:sk1], v[sk0:sk1]
        for b0, b1 in _blocks(sq0, sq1, sk1 - sk0, num_heads):
            s = _scores(q[b0:b1], k_doc, scale, causal, b0 - sq0, sq1 - sq0, sk1 - sk0)
            m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            o = torch.einsum("gaqk,kgd->qgad", p / denom.clamp_min(1e-30), v_doc.float())
            out[b0:b1] = o.reshape(b1 - b0, num_heads, -1).to(q.dtype)
            lse_blk = (m + torch.log(denom)).squeeze(-1)  # [G, H/G, bq]; -inf where nothing visible
            lse[:, b0:b1] = lse_blk.reshape(num_heads, b1 - b0)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None,
                       causal=True, scale=None):
    """Reference backward given the forward's ``out`` and ``lse`` (which may be a merged lse of
    several partial attentions, as ring attention passes): ``(dq, dk, dv)`` in the input dtypes.

    ``P = exp(S - lse)``, ``dV = Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O))``,
    ``dQ = scale · dS K``, ``dK = scale · dSᵀ Q``; GQA gradients summed over each group's heads.
    """
    num_heads, num_groups = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    delta = (dout.float() * out.float()).sum(-1)  # [Tq, H]
    for sq0, sq1, sk0, sk1 in _doc_spans(cu_seqlens_q, cu_seqlens_k):
        if sk1 == sk0:
            continue
        k_doc, v_doc = k[sk0:sk1], v[sk0:sk1]
        for b0, b1 in _blocks(sq0, sq1, sk1 - sk0, num_heads):
            s = _scores(q[b0:b1], k_doc, scale, causal, b0 - sq0, sq1 - sq0, sk1 - sk0)
            bq = b1 - b0
            lse_blk = lse[:, b0:b1].reshape(num_groups, -1, bq, 1)
            p = torch.exp(s - lse_blk.clamp_min(torch.finfo(torch.float32).min))  # 0 where masked
            do = dout[b0:b1].float().view(bq, num_groups, -1, dout.shape[-1])     # [bq, G, a, D]
            dv[sk0:sk1] += torch.einsum("gaqk,qgad->kgd", p, do)
            dp = torch.einsum("qgad,kgd->gaqk", do, v_doc.float())
            d_blk = delta[b0:b1].view(bq, num_groups, -1).permute(1, 2, 0).unsqueeze(-1)
            ds = p * (dp - d_blk) * scale
            dq[b0:b1] = torch.einsum("gaqk,kgd->qgad", ds, k_doc.float()).reshape(bq, num_heads, -1)
            qg = q[b0:b1].float().view(bq, num_groups, -1, q.shape[-1])
            dk[sk0:sk1] += torch.einsum("gaqk,qgad->kgd", ds, qg)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _LocalAttention(torch.autograd.Function):
    """Autograd over the kernel contract; the implementation is chosen by ``dispatch`` (flash
    kernels on CUDA, this module's reference elsewhere)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal, scale):
        from engine.kernels import dispatch

        out, lse = dispatch.forward(q, k, v, cu_q, cu_k, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from engine.kernels import dispatch

        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = dispatch.backward(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                       causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def local_attention(q, k, v, cu_seqlens, causal=True, scale=None):
    """Varlen self-attention of packed documents on one rank (autograd through the contract)."""
    return _LocalAttention.apply(q, k, v, cu_seqlens, cu_seqlens, causal, scale)
