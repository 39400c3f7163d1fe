"""Estimated step time of a mesh: FLOPs over the device's effective rate, the pipeline bubble, and
the communication that does not overlap.

Per sequence of S tokens (2 FLOPs per multiply-add): linear layers S·[L·(2h(H+2G)d + 2Hd·h + 6hf)
+ 2hV] forward, causal attention 2·L·H·d·S² forward (QKᵀ and PV, half the square). A step runs
the linears 3 times (forward, two backward matmuls) and attention 3.5 times (the backward has five
matmuls against the forward's two), plus what ``train.recompute`` runs again
(engine/model/recompute.py); DPO adds the reference model's forward. The work of ``global_batch``
sequences is spread evenly over all GPUs, then stretched by the pipeline bubble (pp − 1)/(m·vpp)
(m micro-batches per dp rank; Seq1F1B: m·k).

Communication, bytes per rank per step over the bandwidth of the links it crosses (intra-node when
the group lies inside a node under the order tp-cp-dp-pp, else inter-node), none of it overlapped
except the ring's K/V, which hides behind the attention it feeds (only the excess counts):
tp: 4 all-gathers/reduce-scatters of [T, h] per layer forward, 4 backward, and those of the
recomputed forward (4; ``selective``: 1); Ulysses: all-to-alls of q, k, v and the output, forward,
backward and once more under any recompute; ring: (rp − 1) K/V blocks forward (again under
``full``/``selective``), K/V and fp32 dK/dV backward; dp×cp: the fp32 gradient
all-reduce (zero1: reduce-scatter + parameter all-gather; fsdp2: two parameter all-gathers + the
gradient reduce-scatter); pp: the activations and their gradients at stage boundaries; offload:
gradients to and masters from the host over PCIe plus the CPU Adam (fsdp2: the parameter shards
to the device for both gathers and the gradient shards back); activation offload: each offloaded
layer input out and back over PCIe on side streams, hidden behind the compute (only the excess
counts). The fused loss runs the output layer once more in backward; a tiled MLP runs the MLP
forward once more (its tiles are rebuilt inside backward).
"""
from __future__ import annotations

from engine.plan.activations import _kv_heads_per_rank, kept_per_layer
from engine.plan.memory import Mesh, Run, micro_batches, tokens_per_rank
from engine.plan.models import ModelSpec, param_counts


def flops_per_sequence(m: ModelSpec, seq_len: int) -> dict[str, float]:
    """Forward FLOPs of one sequence: ``qkv``, ``proj``, ``mlp`` (all layers), ``head`` (the output
    layer) and causal ``attention``."""
    h, H, G, d, f, L = (m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim,
                        m.ffn_hidden_size, m.num_layers)
    return {"qkv": seq_len * L * 2 * h * (H + 2 * G) * d, "proj": seq_len * L * 2 * H * d * h,
            "mlp": seq_len * L * 6 * h * f, "head": seq_len * 2 * h * m.vocab_size,
            "attention": 2.0 * L * H * d * seq_len**2}


def step_flops(m: ModelSpec, run: Run) -> tuple[float, float]:
    """``(linear, attention)`` FLOPs of one sequence's training step: forward + backward (linears
    ×3, attention ×3.5), the recomputed forward parts (``full``: the layers; ``attention-cached``:
    the layers but the attention; ``selective``: QKV projection and attention), DPO's reference."""
    f = flops_per_sequence(m, run.seq_len)
    fwd = f["qkv"] + f["proj"] + f["mlp"] + f["head"]
    again = {"none": 0.0, "full": fwd - f["head"], "attention-cached": fwd - f["head"],
             "selective": f["qkv"]}[run.recompute]
    again += f["head"] * (run.loss_chunk > 0) + f["mlp"] * (run.tile_mlp > 1)
    attn = 3.5 + (run.recompute in ("full", "selective"))
    ref = run.recipe == "dpo"
    return 3 * fwd + again + ref * fwd, f["attention"] * (attn + ref)


def _bw(device, inside_node: bool) -> float:
    return device.intra_node_bw if inside_node else device.inter_node_bw


def step_time(m: ModelSpec, mesh: Mesh, run: Run, device, gpus_per_node: int = 8) -> dict[str, float]:
    """Seconds per optimizer step, by part; ``total`` is their sum."""
    gbs = run.global_batch_size or mesh.dp * run.micro_batch_size
    lin, att = step_flops(m, run)
    attention_s = gbs * att / device.attention_flops / mesh.world
    compute = gbs * lin / device.linear_flops / mesh.world + attention_s
    mb = micro_batches(run, mesh)
    slices = mb * (run.seq_chunks if run.pp_schedule == "seq1f1b" else mesh.vpp)
    out = {"compute": compute, "bubble": compute * (mesh.pp - 1) / slices}
    s, T = (2 if run.bf16 else 4), tokens_per_rank(run.seq_len, mesh, run.micro_batch_size)
    work = m.num_layers / mesh.pp * mb * (1 + (run.recipe == "dpo") / 2)  # layer passes (DPO: + reference fwd)
    rc, tp, hp, rp = run.recompute, mesh.tp, mesh.hp, mesh.rp
    # collectives per layer: tp (all-gather / reduce-scatter of [T, h]); Ulysses (q, k, v, out)
    tp_colls = 8 + {"none": 0, "selective": 1}.get(rc, 4)
    out["tp"] = (tp_colls * (tp - 1) / tp * T * m.hidden_size * s * work / _bw(device, True)) if tp > 1 else 0.0
    g, heads = _kv_heads_per_rank(m, tp, hp), m.num_attention_heads / tp
    a2a = (hp - 1) / hp * T * s * m.head_dim * (2 * heads + 2 * g) * (2 + (rc != "none")) * work
    out["ulysses"] = a2a / _bw(device, tp * hp <= gpus_per_node) if hp > 1 else 0.0
    ring = (rp - 1) * T * 2 * g * m.head_dim * (s * (1 + (rc in ("full", "selective"))) + s + 4) * work
    out["ring"] = max(0.0, ring / _bw(device, tp * mesh.cp <= gpus_per_node) - attention_s) if rp > 1 else 0.0
    n = param_counts(m, tp, round(m.num_layers / mesh.pp))
    P, D = n["sharded"] + n["replicated"], mesh.dp * mesh.cp
    per_elem = {"none": 2 * 4, "zero1": 4 + s, "fsdp2": 2 * s + 4}[run.sharding]
    out["dp"] = (D - 1) / D * P * per_elem / _bw(device, tp * D <= gpus_per_node) if D > 1 else 0.0
    out["pp"] = (2 * T / tp * m.hidden_size * s * mb / _bw(device, mesh.world // mesh.pp < gpus_per_node)
                 if mesh.pp > 1 else 0.0)
    moved = (2 * 4 + 4) if run.sharding == "fsdp2" else 8  # bytes per parameter over PCIe per step
    out["offload"] = (moved * P / D / device.host_bw + P / D * device.cpu_adam_s_per_param) if run.offload else 0.0
    if run.offload_activations:
        layers = m.num_layers / mesh.pp
        kept = min(run.offload_keep_layers * mesh.vpp, layers)
        per_layer = kept_per_layer(m, tp, hp, s, run.recompute, run.tile_mlp) * T
        pcie = 2 * per_layer * (layers - kept) * mb / device.host_bw
        out["offload"] += max(0.0, pcie - compute)
    out["total"] = sum(out.values())
    return out
