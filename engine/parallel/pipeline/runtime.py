"""One pipeline runtime for every schedule (and for pp = 1, where it is plain gradient
accumulation): it walks this rank's communication plan, moving activations forward and their
gradients backward between neighbouring stages.

The plan (:func:`~engine.parallel.pipeline.schedules.pipeline_plan`) is a pure function of the
schedule: a list of steps, each one p2p batch (:func:`engine.parallel.p2p.exchange`: the sends
of what the previous slot produced and the receives of what this slot consumes, posted together)
followed by one or two actions. No tags: messages pair in posting order, which the plan's
deadlock check (tests/test_p2p_plan.py) proves delivers each to the right receive. Optionally it
records a timeline: per action, when it started, how long it waited for its batch and computed.
"""
from __future__ import annotations

import time

import torch

from engine.loss import token_loss_sum
from engine.parallel.p2p import exchange
from engine.parallel.pipeline.schedules import Msg, input_msg, output_msg, pipeline_plan


class PipelineRuntime:
    """Runs forward/backward of this rank's model ``chunks`` (one per virtual stage) through the
    pipeline schedule ``schedule`` (``seq_chunks`` sequence units per micro-batch for Seq1F1B).

    ``grad_sync``: None, or a callable ``grad_sync(chunk, last)`` for overlapping gradient
    reduction with the backward. :meth:`run` calls it once per backward action of model chunk
    ``chunk`` (index into ``chunks``), on the host, after the action's output gradient has been
    received and immediately before autograd runs that backward (so hooks it arms fire during
    it); ``last`` is True exactly for the final backward action of ``chunk`` in this
    :meth:`run` call — once that backward has run, the chunk's gradients of this call are final
    — and False for the earlier ones. Each chunk gets exactly one ``last=True`` per call (also
    with pp = 1 or a single micro-batch); every rank calls it in its own schedule order (chunks
    finish in different orders on different pipeline ranks, the same order on every dp/cp/tp
    rank of one pipeline rank). :meth:`forward_only` never calls it.
    """

    def __init__(self, chunks: list, mesh, schedule: str = "1f1b", seq_chunks: int = 1):
        self.chunks, self.mesh = chunks, mesh
        self.pp, self.rank, self.vpp = mesh.pp, mesh.index("pp"), len(chunks)
        self.ranks = mesh.ranks("pp")
        self.schedule, self.seq_chunks = schedule, seq_chunks
        self.group = mesh.group("pp")
        self.timeline: list[dict] | None = None
        self.grad_sync = None

    def _stage(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def _activation(self, batch, chunk: int) -> torch.Tensor:
        """A buffer for the hidden states entering ``chunk`` (this tp rank's tokens)."""
        dtype = next(self.chunks[0].parameters()).dtype
        shape = (batch.num_tokens // self.mesh.tp, self.chunks[chunk].cfg.hidden_size)
        return torch.empty(shape, dtype=dtype, device=self.mesh.device)

    def _communicate(self, step, index: int, outbox: dict, recv_like) -> dict:
        """Post step ``index``'s batch (sends taken from ``outbox``) and wait; returns the
        received tensors by message."""
        sends = [(outbox.pop(op.msg), self.ranks[op.peer]) for op in step.ops if op.send]
        inbox = {op.msg: recv_like(op.msg) for op in step.ops if not op.send}
        recvs = [(inbox[op.msg], self.ranks[op.peer]) for op in step.ops if not op.send]
        before = ", ".join(f"{k} mb={mb} chunk={c} unit={j}" for k, mb, c, j in step.actions)
        where = f"pipeline rank {self.rank}, {self.schedule} step {index} (before {before or 'none: last sends'})"
        exchange(sends, recvs, self.group, step=where, kind="pp_p2p").wait()
        return inbox

    @torch.no_grad()
    def forward_only(self, batch, head: bool = True) -> torch.Tensor | None:
        """Inference through all stages: this tp rank's logits on the last stage (``head=False``:
        its final hidden states, for the fused loss), None elsewhere."""
        outbox, out = {}, None
        plan = pipeline_plan(self.schedule, self.pp, self.rank, 1, self.vpp, forward_only=True)
        for i, step in enumerate(plan):
            inbox = self._communicate(step, i, outbox, lambda msg: self._activation(batch, msg.stage // self.pp))
            for action in step.actions:
                c = action[2]
                need = input_msg(action, self.pp, self.rank, self.vpp)
                x = inbox.pop(need.msg) if need else None
                last = self._stage(c) == self.pp * self.vpp - 1
                out = self.chunks[c](batch, x) if head or not last else self.chunks[c].final_hidden(batch, x)
                send = output_msg(action, self.pp, self.rank, self.vpp)
                if send:
                    outbox[send.msg] = out
        assert not outbox
        return out if self._stage(self.vpp - 1) == self.pp * self.vpp - 1 else None

    def run(self, units: list[list], num_valid: torch.Tensor | None, loss_fn=None) -> torch.Tensor:
        """Forward and backward of every unit ``units[mb][j]``; loss of each = Σ token losses /
        ``num_valid`` (I-5), or ``loss_fn(chunk, unit, hidden)`` (a recipe's, e.g. DPO). Returns
        the summed loss of this rank (non-zero on the last stage)."""
        store, outbox = {}, {}
        total = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        plan = pipeline_plan(self.schedule, self.pp, self.rank, len(units), self.vpp, self.seq_chunks)
        final = {a[2]: (i, a) for i, step in enumerate(plan) for a in step.actions if a[0] == "B"}

        def recv_like(msg: Msg) -> torch.Tensor:
            if msg.kind == "act":
                return self._activation(units[msg.mb][msg.unit], msg.stage // self.pp)
            return torch.empty_like(store[(msg.mb, msg.stage // self.pp, msg.unit)][1])

        for i, step in enumerate(plan):
            t0 = time.perf_counter()
            inbox = self._communicate(step, i, outbox, recv_like)
            for action in step.actions:
                t1 = time.perf_counter()
                need = input_msg(action, self.pp, self.rank, self.vpp)
                received = inbox.pop(need.msg) if need else None
                if action[0] == "F":
                    total += self._forward(action, units, received, store, outbox, num_valid, loss_fn)
                else:
                    if self.grad_sync is not None:
                        self.grad_sync(action[2], final[action[2]] == (i, action))
                    self._backward(action, units, received, store, outbox)
                if self.timeline is not None:
                    kind, mb, c, j = action
                    self.timeline.append({"kind": kind, "mb": mb, "chunk": c, "unit": j, "start": t0,
                                          "wait": t1 - t0, "compute": time.perf_counter() - t1})
                t0 = time.perf_counter()
        assert not outbox and not store, "the plan left messages unsent or activations without backward"
        return total

    def _forward(self, action, units, x, store, outbox, num_valid, loss_fn) -> torch.Tensor:
        """Forward of one unit; keeps (input, output) for its backward; returns its loss."""
        _, mb, c, j = action
        batch, loss = units[mb][j], torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        if x is not None:
            x.requires_grad_(True)
        send = output_msg(action, self.pp, self.rank, self.vpp)
        if send is None:  # the last stage
            out = (loss_fn(self.chunks[c], batch, x) if loss_fn is not None else
                   token_loss_sum(self.chunks[c], batch, x) / num_valid.to(torch.float32))
            loss = out.detach().double()
        else:
            out = self.chunks[c](batch, x)
            outbox[send.msg] = out.detach()
        store[(mb, c, j)] = (x, out)
        return loss

    def _backward(self, action, units, grad, store, outbox) -> None:
        """Backward of one unit from its output gradient (None on the last stage: the loss);
        a Seq1F1B unit adds the gradient later units gave its cached keys/values."""
        _, mb, c, j = action
        x, out = store.pop((mb, c, j))
        roots, grads = [out], [grad]
        cache = getattr(units[mb][j], "cache", None)
        if cache is not None:
            extra_roots, extra_grads = cache.extra_roots(j)
            roots += extra_roots
            grads += extra_grads
        torch.autograd.backward(roots, grads)
        send = output_msg(action, self.pp, self.rank, self.vpp)
        if send is not None:
            outbox[send.msg] = x.grad
