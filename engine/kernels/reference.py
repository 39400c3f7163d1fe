"""The pure-torch attention kernels (dispatch's ``reference`` backend): the contract of DESIGN §6.

``attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale) -> (out, lse)``
and ``attention_backward(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``, exact in fp32; every other
backend is tested against them. (:mod:`engine.kernels.attention` re-exports both beside the autograd
function; this module sits below :mod:`engine.kernels.dispatch` and imports neither.)

Legend: T tokens (documents packed back to back), H query heads, G KV heads (GQA groups), a = H/G
query heads per group, D head dim. ``q_THD [Tq, H, D]``, ``k_TGD/v_TGD [Tk, G, D]``,
``out_THD [Tq, H, D]``, ``lse_HT [H, Tq]`` (fp32). Document i spans ``cu_seqlens[i]:cu_seqlens[i+1]``
in q and in k. With ``causal`` and ``len_q != len_k`` the mask is aligned bottom-right (query j of
n sees keys up to ``len_k - n + j``), as flash-attn does; a query row that sees no key gets out 0,
lse -inf.

Two implementations of the same arithmetic (fp32 accumulation, exact to fp32 round-off), chosen
per document:

- *fused*: on CPU, torch's own flash-attention kernel (the one ``F.scaled_dot_product_attention``
  runs on CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), which
  returns the lse, handles GQA natively and skips the masked half of causal attention. It computes
  the contract exactly only where its (top-left) causal mask is ours: non-causal, or causal with
  ``len_q == len_k``; its backward also needs every query row to see a key;
- *blocked*: plain torch ops on fp32 copies, anywhere and for every case: a block of queries of
  all a heads of one KV group at once (rows ``a·bq``) against the keys it can see, so the score
  matrix never materialises whole and masked key blocks are skipped (see ``_mm`` for why its
  products are torch's BLAS, not oneDNN).

Where both apply, which is faster depends on the CPU, not on a flag one can read off it: the
blocked backward (then with oneDNN products) was 25-30 % faster at 4k tokens on an AMD EPYC Zen 5,
yet 1.4-2x slower on an Intel Sapphire Rapids (AVX-512 and AMX) and a little slower on a Zen 1;
the fused forward is 3-4x faster than the blocked one there. So CPU documents are tuned by
measurement (:mod:`engine.kernels.autotune`): per direction, dtype, causality, heads/KV heads/head
dim and length bucket (the next power of two, from 64 to 4096; longer documents share the 4096
bucket), both kernels are timed once on random inputs of the bucket's size with one KV group
(both kernels' cost is linear in the groups), and the choice is kept in the on-disk cache that
later runs and every rank reuse. ``MESHTRON_CPU_ATTN=auto|fused|blocked`` pins it. Other devices
(the reference on CUDA, e.g. fp32) take the blocked path: nothing is measured there.
"""
from __future__ import annotations

import time

import torch

from engine.kernels.autotune import Tuner

# fp32 scores per block of the blocked path: about 8 MiB, so blocks stay in cache
_SCORE_BUDGET = 2**21
_KEY_TILE = 512          # keys per block in the blocked backward
_ROWS = 512              # query rows (a heads × positions) per block in the blocked backward
_NEG_INF = float("-inf")
_MIN = torch.finfo(torch.float32).min


def _doc_spans(cu_q: torch.Tensor, cu_k: torch.Tensor):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq) - 1} documents but cu_seqlens_k has {len(ck) - 1}")
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


# -- the fused CPU kernel ----------------------------------------------------------------------
def _fused_ops():
    """torch's CPU flash-attention kernel ``(forward, backward)``, or None in a torch without it."""
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return (fwd, bwd) if fwd is not None and bwd is not None else None


_FUSED = _fused_ops()
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _fused(q, causal: bool, len_q: int, len_k: int) -> bool:
    """Whether the fused CPU kernel computes this document exactly as the contract says."""
    return (_FUSED is not None and q.device.type == "cpu" and q.dtype in _FUSED_DTYPES
            and (not causal or len_q == len_k))


def _bhld(x_TND: torch.Tensor) -> torch.Tensor:
    """``[L, heads, D]`` as the kernel's ``[1, heads, L, D]`` (a view: no copy)."""
    return x_TND.transpose(0, 1).unsqueeze(0)


def _thd(x_BHLD: torch.Tensor) -> torch.Tensor:
    return x_BHLD.squeeze(0).transpose(0, 1)


# -- the blocked path --------------------------------------------------------------------------
def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` in fp32, through torch's BLAS (MKL here).

    Not oneDNN's ``mkldnn._linear_pointwise``, which this path used to call for its AVX-512 GEMMs
    on AMD: on an Intel Sapphire Rapids (torch 2.13, oneDNN 3.12, 2 threads), after torch's fused
    CPU attention kernel had run in the process, its first products came back from one thread at
    about 2e-5 relative error in 4 of 60 runs (0 of 60 through matmul, and 0 of 60 without the fused
    kernel first): neither exact in fp32 nor reproducible, which a candidate must be."""
    return x @ w.t()


def _visible_end(causal: bool, j1: int, offset: int, len_k: int) -> int:
    """Keys [0, end) that some query of the block ending at row j1 can see."""
    return min(len_k, j1 + offset) if causal else len_k


def _mask(s_ABK, causal: bool, j0: int, j1: int, k0: int, k1: int, offset: int) -> None:
    """-inf where key k0 + c is after query j0 + r (bottom-right causal), in ``s [a, bq, k1-k0]``."""
    if causal and k1 - 1 > j0 + offset:
        qpos = torch.arange(j0, j1, device=s_ABK.device) + offset
        kpos = torch.arange(k0, k1, device=s_ABK.device)
        s_ABK.masked_fill_(kpos[None, :] > qpos[:, None], _NEG_INF)


def _group_rows(x_LAD: torch.Tensor) -> torch.Tensor:
    """``[bq, a, D]`` → ``[a·bq, D]`` rows head-major (contiguous copy)."""
    return x_LAD.transpose(0, 1).reshape(-1, x_LAD.shape[-1]).contiguous()


def _blocked_forward(q, k, v, causal, scale, out, lse):
    """One document: writes ``out [n, H, D]`` and ``lse [H, n]`` (views of the results)."""
    n, m, heads, groups = q.shape[0], k.shape[0], q.shape[1], k.shape[1]
    a, offset = heads // groups, m - n
    bq = max(16, min(1024, _SCORE_BUDGET // max(1, m * a)))  # positions per block: scores ≤ the budget
    q32 = q.float() * scale
    for g in range(groups):
        kg, vg = k[:, g].float().contiguous(), v[:, g].float().contiguous()
        hs = slice(g * a, (g + 1) * a)
        for j0 in range(0, n, bq):
            j1 = min(j0 + bq, n)
            end = _visible_end(causal, j1, offset, m)
            if end <= 0:  # no query of the block sees a key: out 0, lse -inf (as initialised)
                continue
            s = _mm(_group_rows(q32[j0:j1, hs]), kg[:end])                  # [a·bq, end]
            _mask(s.view(a, j1 - j0, end), causal, j0, j1, 0, end, offset)
            mx = s.amax(-1, keepdim=True).clamp_min(_MIN)
            den = s.sub_(mx).exp_().sum(-1, keepdim=True)
            o = _mm(s, vg[:end].t()).div_(den.clamp_min(1e-30))            # [a·bq, D]
            out[j0:j1, hs] = o.view(a, j1 - j0, -1).transpose(0, 1)
            lse[hs, j0:j1] = (mx + den.log()).view(a, j1 - j0)              # -inf where nothing visible


def _blocked_backward(dout, q, k, v, out, lse, causal, scale, dq, dk, dv):
    """One document: writes ``dq [n, H, D]``, ``dk``/``dv [m, G, D]`` (views of the results)."""
    n, m, heads, groups = q.shape[0], k.shape[0], q.shape[1], k.shape[1]
    a, offset = heads // groups, m - n
    bq = max(1, _ROWS // a)
    q32 = q.float() * scale
    do32 = dout.float()
    delta = (do32 * out.float()).sum(-1)                                     # [n, H]
    for g in range(groups):
        kg, vg = k[:, g].float().contiguous(), v[:, g].float().contiguous()
        dk_t = torch.zeros(k.shape[-1], m, dtype=torch.float32, device=q.device)   # dKᵀ [D, m]
        dv_t = torch.zeros_like(dk_t)
        hs = slice(g * a, (g + 1) * a)
        for j0 in range(0, n, bq):
            j1 = min(j0 + bq, n)
            end = _visible_end(causal, j1, offset, m)
            if end <= 0:
                dq[j0:j1, hs] = 0
                continue
            qb, dob = _group_rows(q32[j0:j1, hs]), _group_rows(do32[j0:j1, hs])
            qb_t, dob_t = qb.t().contiguous(), dob.t().contiguous()
            lse_b = lse[hs, j0:j1].reshape(-1, 1).clamp_min(_MIN)           # so masked P = exp(-inf) = 0
            delta_b = delta[j0:j1, hs].t().reshape(-1, 1)
            dqb = None
            for k0 in range(0, end, _KEY_TILE):
                k1 = min(k0 + _KEY_TILE, end)
                p = _mm(qb, kg[k0:k1])
                _mask(p.view(a, j1 - j0, k1 - k0), causal, j0, j1, k0, k1, offset)
                p.sub_(lse_b).exp_()                                        # P
                dv_t[:, k0:k1] += _mm(dob_t, p.t())                         # (Pᵀ dO)ᵀ
                ds = _mm(dob, vg[k0:k1]).sub_(delta_b).mul_(p)              # P ∘ (dO Vᵀ − δ)
                part = _mm(ds, kg[k0:k1].t())
                dqb = part if dqb is None else dqb.add_(part)
                dk_t[:, k0:k1] += _mm(qb_t, ds.t())                         # (scale·dSᵀ Q)ᵀ
            dq[j0:j1, hs] = dqb.mul_(scale).view(a, j1 - j0, -1).transpose(0, 1)
        dk[:, g] = dk_t.t()
        dv[:, g] = dv_t.t()


# -- the measured choice between them ---------------------------------------------------------
KERNEL_ENV = "MESHTRON_CPU_ATTN"
TUNER = Tuner("cpu-attention", ("fused", "blocked"), KERNEL_ENV)
_BUCKETS = (64, 4096)    # lengths are measured at the next power of two, clamped to this range
_WARM = 512              # a warm-up run at up to this many tokens before a candidate is timed
_TIMED = 0.05            # seconds: a candidate faster than this is rerun (up to _REPEATS runs), best kept
_REPEATS = 5


def _bucket(n: int) -> int:
    return min(_BUCKETS[1], max(_BUCKETS[0], 1 << (n - 1).bit_length()))


def _use_fused(direction: str, q, k, causal: bool, len_q: int, len_k: int) -> bool:
    """Whether this document runs the fused kernel, where ``_fused`` says it may: the measured
    (cached) or pinned choice for its bucket. float64 always does: the blocked path computes in fp32."""
    if q.dtype == torch.float64:
        return True
    n, m, a, dim = _bucket(len_q), _bucket(len_k), q.shape[1] // k.shape[1], q.shape[-1]
    key = (direction, str(q.dtype).removeprefix("torch."), "causal" if causal else "full", f"q={n}", f"k={m}",
           f"heads={q.shape[1]}/{k.shape[1]}", f"dim={dim}")
    measure = lambda: _measure(direction, q.dtype, causal, n, m, a, dim)  # noqa: E731
    return TUNER.choose(key, measure) == "fused"


def _seconds(fn) -> float:
    """Best time of ``fn()``: one run when it is long, up to ``_REPEATS`` when it is short. CPU time
    of this thread with one intra-op thread (robust to other processes), else wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    best = total = 0.0
    for i in range(_REPEATS):
        t0 = clock()
        fn()
        dt = clock() - t0
        best, total = dt if i == 0 else min(best, dt), total + dt
        if total >= _TIMED:
            break
    return best


def _measure(direction: str, dtype, causal: bool, n: int, m: int, a: int, dim: int) -> dict[str, float]:
    """Seconds of each kernel on one KV group (``a`` query heads) with ``n`` queries and ``m`` keys,
    on random inputs from a private generator (the global RNG is not touched). Any dispatch mode
    active at the call (a fake-tensor or counting mode) is set aside: these are real CPU runs."""
    from torch.utils._python_dispatch import _disable_current_modes

    def inputs(length_q, length_k):
        gen = torch.Generator().manual_seed(length_q * 65537 + length_k)
        q, dout = (torch.randn(length_q, a, dim, generator=gen).to(dtype) for _ in range(2))
        k, v = (torch.randn(length_k, 1, dim, generator=gen).to(dtype) for _ in range(2))
        if direction == "forward":
            return q, k, v, None, None, torch.empty(a, length_q)
        o, lse = _FUSED[0](_bhld(q), _bhld(k), _bhld(v), 0.0, causal, scale=dim ** -0.5)
        return q, k, v, dout, _thd(o), lse[0]

    def kernels(q, k, v, dout, out, lse):
        scale = dim ** -0.5
        if direction == "forward":
            def blocked():
                o32 = torch.zeros(q.shape, dtype=torch.float32)
                _blocked_forward(q, k, v, causal, scale, o32, torch.full(lse.shape, _NEG_INF))
                return o32.to(dtype)
            return {"fused": lambda: _FUSED[0](_bhld(q), _bhld(k), _bhld(v), 0.0, causal, scale=scale),
                    "blocked": blocked}

        def blocked_backward():
            grads = [torch.zeros(x.shape, dtype=torch.float32) for x in (q, k, v)]
            _blocked_backward(dout, q, k, v, out, lse, causal, scale, *grads)
            return [g.to(dtype) for g in grads]
        return {"fused": lambda: _FUSED[1](_bhld(dout), _bhld(q), _bhld(k), _bhld(v), _bhld(out),
                                           lse.unsqueeze(0).contiguous(), 0.0, causal, scale=scale),
                "blocked": blocked_backward}

    with _disable_current_modes(), torch.no_grad():
        warm = kernels(*inputs(min(n, _WARM), min(m, _WARM)))
        timed = kernels(*inputs(n, m))
        seconds = {}
        for name in timed:
            warm[name]()
            seconds[name] = _seconds(timed[name])
        # A first run may pay one-time costs (allocations, kernel set-up for new shapes). Where that
        # could change the choice, both contenders run again.
        close = [name for name in seconds if seconds[name] < 2 * min(seconds.values())]
        for name in close if len(close) > 1 else ():
            seconds[name] = min(seconds[name], _seconds(timed[name]))
    return seconds


# -- the contract ------------------------------------------------------------------------------
def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None,
                      causal=True, scale=None):
    """Forward: ``(out_THD, lse_HT)``; see the module docstring."""
    num_heads, num_groups = q.shape[1], k.shape[1]
    if num_heads % num_groups:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_groups} KV heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    spans = _doc_spans(cu_seqlens_q, cu_seqlens_k)
    if (len(spans) == 1 and spans[0] == (0, q.shape[0], 0, k.shape[0]) and q.shape[0] and k.shape[0]
            and _fused(q, causal, q.shape[0], k.shape[0])
            and _use_fused("forward", q, k, causal, q.shape[0], k.shape[0])):  # one document: no copies
        o, l = _FUSED[0](_bhld(q), _bhld(k), _bhld(v), 0.0, causal, scale=scale)
        return _thd(o), l[0]
    out = torch.zeros_like(q)
    lse = torch.full((num_heads, q.shape[0]), _NEG_INF, dtype=torch.float32, device=q.device)
    for sq0, sq1, sk0, sk1 in spans:
        if sk1 == sk0 or sq1 == sq0:  # no keys: out stays 0, lse -inf
            continue
        if _fused(q, causal, sq1 - sq0, sk1 - sk0) and _use_fused("forward", q, k, causal, sq1 - sq0, sk1 - sk0):
            o, l = _FUSED[0](_bhld(q[sq0:sq1]), _bhld(k[sk0:sk1]), _bhld(v[sk0:sk1]), 0.0, causal,
                             scale=scale)
            out[sq0:sq1] = _thd(o)
            lse[:, sq0:sq1] = l[0]
        else:
            o32 = torch.zeros(sq1 - sq0, num_heads, q.shape[-1], dtype=torch.float32, device=q.device)
            _blocked_forward(q[sq0:sq1], k[sk0:sk1], v[sk0:sk1], causal, scale, o32, lse[:, sq0:sq1])
            out[sq0:sq1] = o32
    return out, lse


def _backward_fused(q, k, causal, lse_doc, len_q: int, len_k: int) -> bool:
    if not _fused(q, causal, len_q, len_k) or not _use_fused("backward", q, k, causal, len_q, len_k):
        return False
    return bool(torch.isfinite(lse_doc).all())  # the kernel needs every row to see a key


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None,
                       causal=True, scale=None):
    """Backward given the forward's ``out`` and ``lse`` (which may be a merged lse of
    several partial attentions, as ring attention passes): ``(dq, dk, dv)`` in the input dtypes.

    ``P = exp(S - lse)``, ``dV = Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O))``,
    ``dQ = scale · dS K``, ``dK = scale · dSᵀ Q``; GQA gradients summed over each group's heads.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    spans = _doc_spans(cu_seqlens_q, cu_seqlens_k)
    fused = [sk1 > sk0 and sq1 > sq0 and _backward_fused(q, k, causal, lse[:, sq0:sq1], sq1 - sq0, sk1 - sk0)
             for sq0, sq1, sk0, sk1 in spans]
    if len(spans) == 1 and fused[0] and spans[0] == (0, q.shape[0], 0, k.shape[0]):
        grads = _FUSED[1](_bhld(dout.to(q.dtype)), _bhld(q), _bhld(k), _bhld(v), _bhld(out.to(q.dtype)),
                          lse.unsqueeze(0).contiguous(), 0.0, causal, scale=scale)
        return tuple(_thd(g) for g in grads)
    acc = q.dtype if all(fused) else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for (sq0, sq1, sk0, sk1), use_fused in zip(spans, fused):
        if sk1 == sk0 or sq1 == sq0:
            continue
        if use_fused:
            grads = _FUSED[1](_bhld(dout[sq0:sq1].to(q.dtype)), _bhld(q[sq0:sq1]), _bhld(k[sk0:sk1]),
                              _bhld(v[sk0:sk1]), _bhld(out[sq0:sq1].to(q.dtype)),
                              lse[:, sq0:sq1].unsqueeze(0).contiguous(), 0.0, causal, scale=scale)
            for buf, g, (a, b) in zip((dq, dk, dv), grads, ((sq0, sq1), (sk0, sk1), (sk0, sk1))):
                buf[a:b] = _thd(g)
        else:
            _blocked_backward(dout[sq0:sq1], q[sq0:sq1], k[sk0:sk1], v[sk0:sk1], out[sq0:sq1], lse[:, sq0:sq1],
                              causal, scale, dq[sq0:sq1], dk[sk0:sk1], dv[sk0:sk1])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

