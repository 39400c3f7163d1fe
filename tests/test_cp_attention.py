"""Context-parallel attention against full single-process attention (DESIGN §3, §6).

In one gloo world of 4 ranks: ring (cp = 2, 4), Ulysses (cp = 2, 4), hybrid 2×2 in both
placements and the double ring (rp = 4, window 2), on a packed batch of uneven documents (some
shorter than 2·cp before padding), causal, GQA 4:1 and 8:2. Outputs and q/k/v gradients of every
real token equal the full attention's: max|cp − ref| / max|ref| ≤ 1e-5 (fp32).
The communication counter checks the analytic traffic: per pass, 2·(rp−1) K/V blocks of the real
KV heads on the ring (and 2·(rp−1) dK/dV blocks in backward); 4 all-to-alls each way for Ulysses.
The double ring's traffic runs on its inner-window and outer-ring groups (the mesh's rp_inner and
rp_outer), never on the whole rp group, so NCCL can overlap the two rings.
"""
from __future__ import annotations

import torch

from tests.harness import max_rel_diff, run_world

DOC_LENS = [3, 1, 2, 37, 64, 13, 90, 6]
HEADS = [(4, 1, 16), (8, 2, 8)]  # (query heads, KV heads, head dim): GQA 4:1 and 8:2
MODES = [  # (name, cp, hp, placement, ring_window)
    ("ring-cp2", 2, 1, "head-first", 0), ("ring-cp4", 4, 1, "head-first", 0),
    ("ulysses-cp2", 2, 2, "head-first", 0), ("ulysses-cp4", 4, 4, "head-first", 0),
    ("hybrid-2x2-head-first", 4, 2, "head-first", 0), ("hybrid-2x2-context-first", 4, 2, "context-first", 0),
    ("double-ring-rp4-w2", 4, 1, "head-first", 2),
]


def reference(q, k, v, dout, cu):
    from engine.kernels.attention import local_attention

    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = local_attention(q, k, v, cu)
    (out * dout).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def check_mode(mesh, mode, heads, counts):
    from engine.data.packing import PackedBatch
    from engine.parallel.comm import count_comm
    from engine.parallel.context import make_core_attention
    from engine.parallel.context.layout import split_for_cp

    name, cp, hp, placement, window = mode
    num_heads, num_groups, dim = heads
    total = sum(DOC_LENS)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(total, num_heads, dim, generator=g)
    k, v = (torch.randn(total, num_groups, dim, generator=g) for _ in range(2))
    dout = torch.randn(total, num_heads, dim, generator=g)
    cu = torch.tensor([0] + DOC_LENS).cumsum(0).to(torch.int32)
    ref = reference(q, k, v, dout, cu)

    # the index batch: token i+1 at position i, so each rank's slice says which tokens it holds
    index = PackedBatch(torch.arange(total) + 1, torch.zeros(total, dtype=torch.long),
                        torch.zeros(total, dtype=torch.long), cu)
    cpb = split_for_cp(index, rp=cp // hp, hp=hp, tp=1, ring_rank=mesh.index("rp"), head_rank=mesh.index("hp"))
    idx = cpb.tokens - 1
    real = idx >= 0
    noise = torch.Generator().manual_seed(100 + mesh.rank)

    def local(full):  # this rank's rows; padding rows are noise that must not matter
        t = torch.randn((idx.numel(),) + full.shape[1:], generator=noise)
        t[real] = full[idx[real]]
        return t.requires_grad_(True)

    ql, kl, vl = local(q), local(k), local(v)
    dl = torch.zeros((idx.numel(),) + dout.shape[1:])
    dl[real] = dout[idx[real]]
    core = make_core_attention(mesh, window)
    with count_comm() as c:
        out = core(ql, kl, vl, cpb)
        fwd = {kind: (c.total(kind, "calls"), c.total(kind)) for kind in ("ring_kv", "all_to_all")}
        ring_groups = {key[1] for key in c.calls if key[0] == "ring_kv"}
        c.reset()
        (out * dl).sum().backward()
        bwd = {kind: (c.total(kind, "calls"), c.total(kind)) for kind in ("ring_kv", "ring_dkv", "all_to_all")}
        ring_groups |= {key[1] for key in c.calls if key[0] in ("ring_kv", "ring_dkv")}
    errs = {n: max_rel_diff(got[real], want[idx[real]])
            for n, got, want in zip(("out", "dq", "dk", "dv"), (out.detach(), ql.grad, kl.grad, vl.grad), ref)}
    counts[(name, heads)] = {"fwd": fwd, "bwd": bwd, "local_tokens": idx.numel(), "ring_groups": ring_groups}
    return errs


def world(rank, world_size):
    from engine.mesh import ParallelMesh

    torch.set_num_threads(1)
    report = {}
    for mode in MODES:
        name, cp, hp, placement, window = mode
        mesh = ParallelMesh.build(cp=cp, hp=hp, dp=world_size // cp, placement=placement, ring_window=window)
        for heads in HEADS:
            counts = {}
            errs = check_mode(mesh, mode, heads, counts)
            report[(name, heads)] = (errs, counts[(name, heads)])
    return report


def test_cp_attention_equals_full_attention_and_counts_traffic():
    reports = run_world(4, world, timeout=900)
    for rank, report in enumerate(reports):
        for (name, heads), (errs, counts) in report.items():
            mode = next(m for m in MODES if m[0] == name)
            cp, hp, window = mode[1], mode[2], mode[4]
            rp = cp // hp
            num_heads, num_groups, dim = heads
            assert max(errs.values()) <= 1e-5, (rank, name, heads, errs)
            t = counts["local_tokens"]
            stream = t * hp                                  # the ring rank's stream after Ulysses
            ring_groups = max(num_groups, hp) // hp          # real KV heads per rank on the ring
            block = stream * ring_groups * dim * 4           # one K (or V) block, fp32 bytes
            fwd, bwd = counts["fwd"], counts["bwd"]
            assert fwd["ring_kv"] == (2 * (rp - 1), 2 * (rp - 1) * block), (name, heads, fwd)
            assert bwd["ring_kv"] == (2 * (rp - 1), 2 * (rp - 1) * block), (name, heads, bwd)
            assert bwd["ring_dkv"] == (2 * (rp - 1), 2 * (rp - 1) * block), (name, heads, bwd)
            if window:  # inner window and outer ring each on their own group, never the whole rp group
                w = window  # cp = rp = world here: ring rank = global rank
                inner, outer = tuple(range(rank // w * w, rank // w * w + w)), tuple(range(rank % w, rp, w))
                assert counts["ring_groups"] == {inner, outer}, (rank, counts["ring_groups"])
            elif rp > 1:  # the plain ring: this rank's rp group only
                (group,) = counts["ring_groups"]
                assert len(group) == rp and rank in group, (rank, counts["ring_groups"])
            if hp > 1:
                a2a = t * dim * 4 * (2 * num_heads + 2 * max(num_groups, hp))  # q, out, k, v
                assert fwd["all_to_all"] == (4, a2a) and bwd["all_to_all"] == (4, a2a), (name, heads, fwd, bwd)
            else:
                assert fwd["all_to_all"] == (0, 0) and bwd["all_to_all"] == (0, 0)
        if rank == 0:
            for key, (errs, _) in report.items():
                print(key, {k: f"{v:.1e}" for k, v in errs.items()})
