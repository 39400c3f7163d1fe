"""Local attention kernel dispatch: one contract (DESIGN §6), three implementations.

``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale) -> (out, lse)`` and
``backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale)
-> (dq, dk, dv)`` have the signatures of :mod:`engine.kernels.reference` and pick a kernel per call:

- ``flash_attn``: the flash-attn package (2.6-2.8), imported lazily on first use;
- ``torch_flash``: torch's own varlen flash kernel, ``aten._flash_attention_forward/backward``;
- ``reference``: the pure-torch reference (CPU, fp32, anything else); exact in fp32. On CPU it
  picks between its own two kernels by measurement, cached on disk (engine/kernels/reference.py);
  the choice among these three stays the rule below: nothing is measured on CUDA.

Both flash kernels need CUDA (not ROCm), fp16/bf16, sm80+, and a head dim that is a multiple of 8
and at most 256; they accumulate in fp32, so they match the reference to bf16 round-off, not
bitwise. ``auto`` picks flash_attn, then torch_flash, then the reference; the environment variable
``MESHTRON_ATTN_BACKEND=auto|flash_attn|torch_flash|reference`` forces one (read on every call).

Legend: T tokens (documents packed back to back), H query heads, G KV heads (H % G == 0; query
head h uses KV head h // (H/G), which both flash kernels do natively), D head dim.
``q/out/dout/dq [Tq, H, D]``, ``k/v/dk/dv [Tk, G, D]``, ``lse [H, Tq]`` fp32, ``cu_seqlens``
int32 ``[num_docs + 1]``. That lse layout is the "unpadded" varlen layout that flash-attn >= 2.6
and torch's vendored copy return natively, so no backend reshapes it. Causal with len_q != len_k
is aligned bottom-right. ``max_q``/``max_k`` (the longest document of ``cu_seqlens_q``/``_k``)
are Python ints the caller knows from the host (the batch carries them, I-9); left out, the flash
paths read them off ``cu_seqlens`` — a host-device sync per call, for ad-hoc callers only.

Rows with no visible key (causal with len_q > len_k, or an empty key document) give out 0 and
lse -inf on every backend. The reference does so itself. Both flash kernels write out 0 but lse
+inf (flash-attn 2's softmax normalisation and early exit store INFINITY on the non-split path),
so ``forward`` maps +inf to -inf, and ``backward`` maps -inf back to +inf before the kernel, where
``P = exp(S - lse)`` must be 0 for such rows (-inf would give exp(+inf) or NaN). ``backward`` may
be given a merged lse of several partial attentions (ring attention); the flash kernels then
recompute P from it exactly as the reference does.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os

import torch

from engine.kernels.reference import attention_backward, attention_forward

ENV_VAR = "MESHTRON_ATTN_BACKEND"
BACKENDS = ("flash_attn", "torch_flash", "reference")
CHOICES = ("auto",) + BACKENDS
_INF = float("inf")


# -- selection ---------------------------------------------------------------------------------
def _requested() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not an attention backend; "
                         f"set it to one of {', '.join(CHOICES)} (or unset it for auto)")
    return value


def _flash_unsupported(q: torch.Tensor) -> str | None:
    """Why neither flash kernel can take ``q``; None when they can."""
    if not q.is_cuda:
        return f"the flash kernels need CUDA tensors, got {q.device}"
    if torch.version.hip:  # ROCm's varlen kernels may return a padded [B, H, max_q] lse
        return "the flash paths here are CUDA-only, not ROCm"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the flash kernels need fp16 or bf16, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"the flash kernels need a head dim that is a multiple of 8 and <= 256, got {q.shape[-1]}"
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return "the flash kernels need an sm80 (Ampere) or newer GPU"
    return None


def _available(name: str) -> bool:
    if name == "flash_attn":
        return _flash_attn() is not None
    if name == "torch_flash":  # asked only for a CUDA tensor (_flash_unsupported), so CUDA is there
        check = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        return check() if check is not None else torch.backends.cuda.is_built()
    return True


def available_backends(q: torch.Tensor) -> list[str]:
    """Every backend that can run attention on ``q`` here, in ``auto``'s order of preference."""
    if _flash_unsupported(q) is not None:
        return ["reference"]
    return [name for name in BACKENDS if _available(name)]


def select_backend(q: torch.Tensor) -> str:
    """The backend ``forward``/``backward`` use for ``q``: ``MESHTRON_ATTN_BACKEND`` if set, else
    the first of flash_attn, torch_flash, reference that can run ``q``.

    Raises ValueError for an unknown value of the variable and RuntimeError when the forced
    backend cannot run ``q`` here.
    """
    requested = _requested()
    if requested == "auto":
        return available_backends(q)[0]
    if requested == "reference":
        return requested
    why = _flash_unsupported(q)
    if why is None and not _available(requested):
        why = ("the flash-attn package is not installed or does not import"
               if requested == "flash_attn" else "this torch build has no flash attention kernel")
    if why is not None:
        raise RuntimeError(f"{ENV_VAR}={requested} cannot run here: {why}; "
                           f"unset {ENV_VAR} or set it to auto or reference")
    return requested


# -- flash-attn --------------------------------------------------------------------------------
def _version_kwargs(fn) -> dict:
    """The keyword arguments that changed across flash-attn 2.6-2.8, read off ``fn``'s signature.

    2.6 takes ``window_size=(left, right)`` and returns an 8-tuple from the forward; 2.7+ takes
    ``window_size_left/right``, wraps the function in ``torch.library.custom_op`` (the Python
    signature is on ``_init_fn``) and returns 4; ``softcap`` appeared in 2.6; 2.6's forward has
    ``block_table`` with no default.
    """
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    kwargs = ({"window_size_left": -1, "window_size_right": -1} if "window_size_left" in params
              else {"window_size": (-1, -1)})
    for name, value in (("softcap", 0.0), ("alibi_slopes", None), ("return_softmax", False),
                        ("block_table", None), ("deterministic", False), ("rng_state", None)):
        if name in params:
            kwargs[name] = value
    return kwargs


@functools.cache
def _flash_attn():
    """``(forward, backward, forward kwargs, backward kwargs)`` of flash-attn, or None when it is
    not installed or its CUDA extension does not load (e.g. built against another torch)."""
    try:
        fa = importlib.import_module("flash_attn.flash_attn_interface")
        fwd, bwd = fa._flash_attn_varlen_forward, fa._flash_attn_varlen_backward
    except (ImportError, OSError, AttributeError):
        return None
    return fwd, bwd, _version_kwargs(fwd), _version_kwargs(bwd)


def _fa_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    fwd, _, kwargs, _ = _flash_attn()
    res = fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale,
              causal=causal, **kwargs)
    # 2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state); 2.7+: (out, lse, S_dmask, rng_state)
    return (res[0], res[5]) if len(res) == 8 else (res[0], res[1])


def _fa_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    _, bwd, _, kwargs = _flash_attn()
    if "deterministic" in kwargs:
        kwargs = {**kwargs, "deterministic": torch.are_deterministic_algorithms_enabled()}
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # Writes into dq/dk/dv (2.7+ returns only softmax_d); GQA's dK/dV are summed inside.
    bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
        softmax_scale=scale, causal=causal, **kwargs)
    return dq, dk, dv


# -- torch's flash -----------------------------------------------------------------------------
def _torch_flash_ops():
    return torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward


def _tf_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    # -> (out, logsumexp, rng_state, unused, debug_attn_mask); varlen logsumexp is [H, total_q].
    res = _torch_flash_ops()[0](q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _tf_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    # Dropout is 0, so the kernel never reads the philox state: pass what torch's varlen_attn does.
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = _torch_flash_ops()[1](dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0,
                                       causal, rng_state, unused, scale=scale)
    return dq, dk, dv


_KERNELS = {"flash_attn": (_fa_forward, _fa_backward), "torch_flash": (_tf_forward, _tf_backward)}


# -- the contract ------------------------------------------------------------------------------
def _max_len(cu_seqlens: torch.Tensor, given) -> int:
    if given is not None:
        return int(given)  # a Python int from the host: no device read
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0  # a sync


def _kernel_args(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    cu_q, cu_k = (c.to(device=q.device, dtype=torch.int32).contiguous() for c in (cu_q, cu_k))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return (q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k,
            _max_len(cu_q, max_q), _max_len(cu_k, max_k), scale)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None, causal=True, scale=None):
    """``(out [Tq, H, D], lse [H, Tq] fp32)`` from the backend ``select_backend(q)`` names."""
    backend = select_backend(q)
    if backend == "reference":
        return attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale)
    q, k, v, cu_q, cu_k, max_q, max_k, scale = _kernel_args(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                            max_q, max_k, scale)
    out, lse = _KERNELS[backend][0](q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    if lse.shape != (q.shape[1], q.shape[0]):  # flash-attn < 2.6 pads it to [B, H, max_q]
        raise RuntimeError(f"{backend} returned lse of shape {tuple(lse.shape)}, not [H, Tq]; "
                           f"use flash-attn >= 2.6 or {ENV_VAR}=torch_flash")
    return out, lse.masked_fill(torch.isposinf(lse), -_INF)  # no visible key: +inf -> -inf


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None,
             causal=True, scale=None):
    """``(dq, dk, dv)`` in the input dtypes, given the forward's (or a merged) ``out`` and ``lse``."""
    backend = select_backend(q)
    if backend == "reference":
        return attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_q,
                                  max_k, causal, scale)
    q, k, v, cu_q, cu_k, max_q, max_k, scale = _kernel_args(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                            max_q, max_k, scale)
    dout, out = dout.to(q.dtype).contiguous(), out.to(q.dtype).contiguous()
    lse = lse.float().masked_fill(torch.isneginf(lse), _INF).contiguous()  # so P = exp(S - lse) = 0
    return _KERNELS[backend][1](dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
