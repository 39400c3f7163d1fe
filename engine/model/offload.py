"""Activation offload (``train.offload_activations``): what a layer keeps for backward waits in
host memory.

What moves. Everything autograd saves while a :class:`~engine.model.layers.TransformerLayer` runs
its forward, through ``torch.autograd.graph.saved_tensors_hooks`` entered in
``TransformerLayer.forward``. Under ``train.recompute`` that is what the mode keeps: the hooks are
active where torch's non-reentrant checkpoint is entered, so they see the checkpoint's inputs and
the tensors a region keeps (engine/model/recompute.py) — with ``full`` the layer input only, with
``attention-cached`` the input, out and lse, with ``selective`` the input, the attention output and
the MLP's activations. With ``none`` every activation of the layer moves: legal, exact, but slow
(a layer's whole activations cross the link twice per step).

What stays on the device, and why:
* the first ``keep_layers`` layers of each model chunk (``train.offload_keep_layers``): device
  memory there is to spare is spent before the link (fewer bytes cross it), and on the first
  layers because their backward comes last: the chunk's backward ends with no copy in flight;
* parameters and views of them (a linear keeps its weight; under FSDP2 the unsharded weight is
  all-gathered again for backward anyway) and leaves that require grad (a pipeline stage's input,
  which the schedule holds for its backward anyway): copying them would free nothing;
* the rotary cos/sin tables every layer shares (freed by no single layer);
* tensors below :data:`MIN_BYTES` (a copy's launch costs more than the bytes) and tensors not on
  the model's device.

Streams and events (CUDA). Two side streams per offloader, one per copy direction (the link is
full-duplex: micro-batch m+1's forward copies out while m's backward copies in under 1F1B):
* forward, per saved tensor ``t`` (pack): the D2H stream waits for the compute stream (``t`` is
  written there), copies ``t`` into a pinned host tensor with ``non_blocking=True`` and records an
  event; ``t.record_stream(d2h)`` stops the caching allocator from handing ``t``'s block to another
  tensor before that copy has read it, although the compute stream drops ``t`` at once.
* backward (unpack): the first unpack of layer i of a pass (one forward of the chunk: a
  micro-batch, or a Seq1F1B unit) brings all of layer i's tensors back if they are not on their way
  yet and starts the copies of layer i−1's of the same pass (prefetch, one layer ahead), which
  then overlap layer i's backward (its recomputation included). A copy back allocates its device
  buffer on the compute stream, then the H2D stream waits for the compute stream (the buffer's
  block may have been freed by work still queued there) and for the tensor's D2H event, copies,
  records an event and ``record_stream``s the buffer. Unpack makes the compute stream wait for
  that event — a device-side wait; the host never blocks (I-9: no ``synchronize``, no ``.item()``).
Unpacked tensors are handed over (the offloader drops its device reference), so a layer's
tensors live on the device only from the prefetch until its backward is done. The host copy
lives as long as autograd holds the saved tensor (to the end of that node's backward, or the
graph's release), so a tensor unpacked twice is fetched again.

A contiguous tensor with the same bytes as one the layer saved before (attention's out and its
reshape, ``linear_proj``'s input) shares that one's copy and comes back as a view of it.

Every packed tensor has its own record, kept with its layer in its pass: several micro-batches
of a layer are in flight at once under 1F1B, interleaved and Seq1F1B, and each finds its own.
A pass starts when a layer enters with an index not above the last one's (a chunk's forwards run
one at a time, layer by layer).

Off CUDA (the CPU path, and the tests) the same code runs without pinning or streams: tensors
are copied into separate host tensors and back, synchronously. Under ``meshtron-plan --simulate``
the streams and events are engine/plan/fake_cuda.py's stand-ins and the host copies are fake CPU
tensors, so the report's host memory includes them.

Exactness: copies are bit-exact and dense tensors keep their strides (non-dense views come back
contiguous), so gradients equal those without offload bitwise.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn

#: Saved tensors smaller than this stay on the device.
MIN_BYTES = 64 * 1024


class _Packed:
    """One host copy, and its device copy while one is on its way; ``pending``: saved tensors
    made of it that are not unpacked yet (the device copy is dropped when none is left)."""

    __slots__ = ("host", "layer", "d2h_done", "device", "ready", "pending", "__weakref__")

    def __init__(self, host: torch.Tensor, layer: "_Layer", d2h_done):
        self.host, self.layer, self.d2h_done = host, layer, d2h_done
        self.device = self.ready = None
        self.pending = 1


class _Saved:
    """What autograd holds for one offloaded tensor: its copy, viewed as ``shape`` (a reshape of
    a tensor the layer saved before shares that one's copy: attention's out and linear_proj's input)."""

    __slots__ = ("packed", "shape")

    def __init__(self, packed: _Packed, shape):
        self.packed, self.shape = packed, shape


class _Layer:
    """A layer's offloaded tensors in one pass. The references run one way, autograd's saved
    tensor → :class:`_Packed` → its layer → the pass, and back only weakly, so the records go
    with the graph."""

    __slots__ = ("index", "pass_", "packed", "fetched", "copies", "__weakref__")

    def __init__(self, index: int, pass_: "_Pass"):
        self.index, self.pass_ = index, pass_
        self.packed: list[weakref.ref] = []
        self.fetched = False
        # contiguous copies by (id of the storage's base tensor, its version, offset, numel, dtype):
        # weakrefs to (base, _Packed); the base's weakref tells a live base from a reused id
        self.copies: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}

    def live(self) -> list[_Packed]:
        return [p for p in (r() for r in self.packed) if p is not None]


class ActivationOffload:
    """The offloader of one model chunk (see the module docstring).

    ``device``: the model's device (tensors elsewhere stay); ``keep_layers``: the chunk's first
    layers that are not offloaded; ``min_bytes``: smaller tensors stay (default :data:`MIN_BYTES`).
    """

    def __init__(self, device, keep_layers: int = 0, min_bytes: int | None = None):
        self.device = torch.device(device)
        self.keep_layers = keep_layers
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda and torch.cuda.is_available()  # not under the simulator's fake device
        self._streams = None
        self._pass: _Pass | None = None
        self._last = -1
        self._passes: weakref.WeakSet = weakref.WeakSet()
        self.bytes_out = self.bytes_in = 0  # copied to the host / back, since construction

    def attach(self, layers) -> None:
        """Give each layer (a ``TransformerLayer``) its hooks: ``layer.offload``."""
        for i, layer in enumerate(layers):
            layer.offload = _LayerHooks(self, i) if i >= self.keep_layers else None

    # -- forward --------------------------------------------------------------------------------
    def saving(self, index: int, shared: tuple) -> contextlib.AbstractContextManager:
        """The saved-tensor hooks of layer ``index`` for one forward; ``shared``: tensors that
        stay (the rotary tables)."""
        if self._pass is None or index <= self._last:  # a new forward of the chunk
            self._pass = _Pass()
            self._passes.add(self._pass)
        self._last = index
        layer = _Layer(index, self._pass)
        self._pass.layers[index] = weakref.ref(layer)
        shared_ids = {id(t) for t in shared}
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(layer, shared_ids, t), self._unpack)

    def _stays(self, t: torch.Tensor, shared_ids: set) -> bool:
        base = t if t._base is None else t._base
        return (t.device != self.device or t.numel() * t.element_size() < self.min_bytes
                or isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)
                or id(t) in shared_ids or id(base) in shared_ids)

    def _pack(self, layer: _Layer, shared_ids: set, t: torch.Tensor):
        if self._stays(t, shared_ids):
            return t
        base = t if t._base is None else t._base
        key = (id(base), t._version, t.storage_offset(), t.numel(), t.dtype) if t.is_contiguous() else None
        if key in layer.copies:
            base_ref, packed_ref = layer.copies[key]
            packed = packed_ref()
            if base_ref() is base and packed is not None:  # the same bytes, already on their way
                packed.pending += 1
                return _Saved(packed, t.shape)
        with torch.no_grad():
            src = t.detach()
            host = torch.empty_like(src, device="cpu", pin_memory=self.pin)  # dense strides kept
            done = None
            if self.cuda:
                d2h, _ = self._side_streams()
                d2h.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(d2h):
                    host.copy_(src, non_blocking=True)
                src.record_stream(d2h)
                done = d2h.record_event()
            else:
                host.copy_(src)
        self.bytes_out += host.numel() * host.element_size()
        packed = _Packed(host, layer, done)
        layer.packed.append(weakref.ref(packed))
        if key is not None:
            layer.copies[key] = (weakref.ref(base), weakref.ref(packed))
        return _Saved(packed, None)

    # -- backward -------------------------------------------------------------------------------
    def _unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        packed, layer = saved.packed, saved.packed.layer
        if not layer.fetched:  # the layer's backward begins: bring it back, and the one before it
            self._fetch(layer)
            before = layer.pass_.layer(layer.index - 1)
            if before is not None and not before.fetched:
                self._fetch(before)
        if packed.device is None:  # unpacked before (the host copy stays while autograd holds it)
            self._copy_in([packed])
        out, ready = packed.device, packed.ready
        packed.pending -= 1
        if packed.pending <= 0:  # handed over: the consumers own the device copy now
            packed.device = packed.ready = None
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        return out if saved.shape is None else out.view(saved.shape)

    def _fetch(self, layer: _Layer) -> None:
        layer.fetched = True
        self._copy_in([p for p in layer.live() if p.device is None])

    def _copy_in(self, packs: list[_Packed]) -> None:
        if not packs:
            return
        self.bytes_in += sum(p.host.numel() * p.host.element_size() for p in packs)
        with torch.no_grad():
            bufs = [torch.empty_like(p.host, device=self.device) for p in packs]  # on the compute stream
            if not self.cuda:
                for p, buf in zip(packs, bufs):
                    p.device = buf.copy_(p.host)
                return
            _, h2d = self._side_streams()
            h2d.wait_stream(torch.cuda.current_stream(self.device))
            for p in packs:
                if p.d2h_done is not None:
                    h2d.wait_event(p.d2h_done)
            with torch.cuda.stream(h2d):
                for p, buf in zip(packs, bufs):
                    buf.copy_(p.host, non_blocking=True)
            for p, buf in zip(packs, bufs):
                buf.record_stream(h2d)  # freed unused, its block still waits for the copy
                p.device = buf
            ready = h2d.record_event()
            for p in packs:
                p.ready = ready

    def _side_streams(self):
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self._streams

    # -- accounting -------------------------------------------------------------------------------
    def held_bytes(self) -> dict[int, int]:
        """Host bytes held now per layer index (every live pass summed); empty when nothing is."""
        out: dict[int, int] = {}
        for p in list(self._passes):
            for index in list(p.layers):
                layer = p.layer(index)
                n = 0 if layer is None else sum(k.host.numel() * k.host.element_size() for k in layer.live())
                if n:
                    out[index] = out.get(index, 0) + n
        return out


class _Pass:
    """One forward of the chunk: its layers, ``{index: weakref to the _Layer}``."""

    __slots__ = ("layers", "__weakref__")

    def __init__(self):
        self.layers: dict[int, weakref.ref] = {}

    def layer(self, index: int) -> _Layer | None:
        ref = self.layers.get(index)
        return None if ref is None else ref()


class _LayerHooks:
    """``layer.offload``: ``with layer.offload(rope): ...`` runs the layer's forward offloading."""

    def __init__(self, offloader: ActivationOffload, index: int):
        self.offloader, self.index = offloader, index

    def __call__(self, shared: tuple):
        return self.offloader.saving(self.index, shared)
