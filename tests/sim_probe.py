"""Run by tests/test_simulate.py in a process of its own (fake CUDA is process-wide): a few
deliberate breaches of NCCL's rules and host syncs on fake ``cuda`` tensors, under the
simulation's StepWatch; prints what it recorded as one JSON line.

Each breach and sync is on a line of its own, tagged by a BREACH or SYNC comment, so the test checks that the
reported file:line is the offending line of this file.
"""
from __future__ import annotations

import json
import sys

import torch

from engine.plan import fake_cuda


def main() -> None:
    fake_cuda.install()
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from engine.plan.sim_checks import StepWatch, group_warnings

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    dev = fake_cuda.DEVICE
    other = dist.new_group([2, 3])  # rank 1 is not a member
    watch = StepWatch(dev)
    with group_warnings(watch), FakeTensorMode(allow_non_fake_inputs=True), watch:
        x = torch.empty(1024, device=dev)
        dist.all_reduce(x)  # fine
        ops = [dist.P2POp(dist.isend, x, 2), dist.P2POp(dist.irecv, torch.empty_like(x), 0)]
        for req in dist.batch_isend_irecv(ops):  # fine: batched
            req.wait()
        dist.all_reduce(torch.ones(4))  # BREACH cpu-tensor
        dist.isend(x, 2)  # BREACH bare-send
        dist.all_reduce(x, group=other)  # BREACH not-a-member
        watch.counting = True
        y = x.sum()
        float(y)  # SYNC item
        x[x > 0]  # SYNC nonzero
        x.to("cpu")  # SYNC d2h
        torch.ones(8).to(dev)  # SYNC blocking-h2d
        torch.ones(8).to(dev, non_blocking=True)  # not a sync
        torch.ones(3).sum().item()  # host tensor: not a sync
        n = torch.arange(6).reshape(2, 3)[1].tolist()  # real host values stay real
        watch.counting = False
    print(json.dumps({"violations": watch.violations, "syncs": [[w, k, c] for (w, k), c in watch.syncs.items()],
                      "host_values": n, "unknown_host_values": dict(watch.unknown_host_values)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.exit(0)
