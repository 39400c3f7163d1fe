"""One pipeline runtime for every schedule (and for pp = 1, where it is plain gradient
accumulation): it walks this rank's action list, moving activations forward and their
gradients backward between neighbouring stages with non-blocking point-to-point messages.

Each message carries a tag naming (micro-batch, virtual stage, sequence unit, direction), so
messages between the same two ranks can never be confused whatever order the schedules post
them in. Optionally it records a timeline: per action, when it started computing and how long
it waited for its input.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from engine.loss import token_loss_sum
from engine.parallel.comm import COUNTER
from engine.parallel.pipeline.schedules import build_schedule


class PipelineRuntime:
    def __init__(self, chunks: list, mesh, schedule: str = "1f1b", seq_chunks: int = 1):
        self.chunks, self.mesh = chunks, mesh
        self.pp, self.rank, self.vpp = mesh.pp, mesh.index("pp"), len(chunks)
        ranks = mesh.ranks("pp")
        self.next, self.prev = ranks[(self.rank + 1) % self.pp], ranks[(self.rank - 1) % self.pp]
        self.schedule, self.seq_chunks = schedule, seq_chunks
        self.group = mesh.group("pp")
        self.timeline: list[dict] | None = None

    def _stage(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def _tag(self, mb: int, stage: int, unit: int, backward: bool) -> int:
        return ((mb * self.pp * self.vpp + stage) * self.seq_chunks + unit) * 2 + int(backward)

    def _send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = t.contiguous()
        COUNTER.record("pp_p2p", self.group, t.numel() * t.element_size())
        self._pending.append(dist.isend(t, dst, group=self.group, tag=tag))

    def _recv(self, like: torch.Tensor, src: int, tag: int) -> torch.Tensor:
        buf = torch.empty_like(like)
        dist.irecv(buf, src, group=self.group, tag=tag).wait()
        return buf

    @torch.no_grad()
    def forward_only(self, batch) -> torch.Tensor | None:
        """Inference through all stages: this tp rank's logits on the last stage, None elsewhere."""
        self._pending, last, out = [], self.pp * self.vpp - 1, None
        dtype = next(self.chunks[0].parameters()).dtype
        for c in range(self.vpp):
            stage = self._stage(c)
            x = None
            if stage > 0:
                shape = (batch.num_tokens // self.mesh.tp, self.chunks[c].cfg.hidden_size)
                x = self._recv(torch.empty(shape, dtype=dtype, device=self.mesh.device), self.prev,
                               self._tag(0, stage, 0, False))
            out = self.chunks[c](batch, x)
            if stage < last:
                self._send(out, self.next, self._tag(0, stage + 1, 0, False))
        for req in self._pending:
            req.wait()
        return out if self._stage(self.vpp - 1) == last else None

    def run(self, units: list[list], num_valid: torch.Tensor | None, loss_fn=None) -> torch.Tensor:
        """Forward and backward of every unit ``units[mb][j]``; loss of each = Σ token losses /
        ``num_valid`` (I-5), or ``loss_fn(chunk, unit, hidden)`` (a recipe's, e.g. DPO). Returns
        the summed loss of this rank (non-zero on the last stage)."""
        self._pending, store, total = [], {}, torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        last = self.pp * self.vpp - 1
        dtype = next(self.chunks[0].parameters()).dtype
        actions = build_schedule(self.schedule, self.pp, self.rank, len(units), self.vpp, self.seq_chunks)
        for kind, mb, c, j in actions:
            stage, batch, t0 = self._stage(c), units[mb][j], time.perf_counter()
            if kind == "F":
                x = None
                if stage > 0:
                    shape = (batch.num_tokens // self.mesh.tp, self.chunks[c].cfg.hidden_size)
                    x = self._recv(torch.empty(shape, dtype=dtype, device=self.mesh.device),
                                   self.prev, self._tag(mb, stage, j, False)).requires_grad_(True)
                t1 = time.perf_counter()
                if stage == last:
                    out = (loss_fn(self.chunks[c], batch, x) if loss_fn is not None else
                           token_loss_sum(self.chunks[c], batch, x) / num_valid.to(torch.float32))
                    total += out.detach().double()
                else:
                    out = self.chunks[c](batch, x)
                    self._send(out.detach(), self.next, self._tag(mb, stage + 1, j, False))
                store[(mb, c, j)] = (x, out)
            else:
                x, out = store.pop((mb, c, j))
                grad = None
                if stage < last:
                    grad = self._recv(out, self.next, self._tag(mb, stage, j, True))
                t1 = time.perf_counter()
                roots, grads = [out], [grad]
                cache = getattr(batch, "cache", None)
                if cache is not None:
                    extra_roots, extra_grads = cache.extra_roots(j)
                    roots += extra_roots
                    grads += extra_grads
                torch.autograd.backward(roots, grads)
                if stage > 0:
                    self._send(x.grad, self.prev, self._tag(mb, stage - 1, j, True))
            if self.timeline is not None:
                self.timeline.append({"kind": kind, "mb": mb, "chunk": c, "unit": j, "start": t0,
                                      "wait": t1 - t0, "compute": time.perf_counter() - t1})
        for req in self._pending:
            req.wait()
        self._pending = []
        return total
