"""FlexSP cost model: predicted time and memory of sequences in an SP group of d ranks.

Legend: s sequence length (tokens); d group size in ranks of the dp×cp pool (each rank is tp
GPUs); hp = min(d, max_hp) the group's Ulysses degree, rp = d / hp its ring degree; L layers,
h hidden, H / G query / KV heads (per tp rank: H/tp, G/tp), D head dim, f MLP width, V vocabulary;
b bytes of an activation element (2 bf16, 4 fp32).

Time of one sequence in a group of d (seconds, every rank of the group busy for that long):

    compute     (α1·s² + α2·s) / d          α1: causal attention, α2: the linear layers, both
                                            from FLOP counts / the device's effective FLOP/s
    all-to-all  (s/d)·W_a2a·(hp−1)/hp bytes leave each rank; on-node and off-node peers are
                served concurrently at the intra- and inter-node bandwidth (a group that leaves a
                node gets slower: the paper's v_d)
    ring        (rp−1)·(s/rp)·W_ring bytes per rank around the ring; the ring overlaps K/V
                transfers with the block attention (engine.parallel.context.ring), so only what
                exceeds the sequence's attention compute α1·s²/d shows

Every document is padded to a multiple of 2·d (I-3) first. A non-empty group adds β_d once per
micro-batch: the device's fixed ``group_overhead_s`` plus the latency of every collective call.
Memory per rank: Σ s/d · bytes_per_token + model states ≤ memory.

The constants come from a device file (``defaults/a100.json``, ``defaults/h100.json``, or one
written by ``tools/calibrate_flexsp.py``), so one file serves every model: α, W and the memory
terms follow from the model config and the training recipe (bf16, recompute, optimizer sharding).
A calibration file may also carry measured ``alpha1`` / ``alpha2`` (used when its
``alpha_model`` matches the config's model) and measured bandwidth tables per group size.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"
SHIPPED = ("a100", "h100")
REQUIRED = ("memory_gb", "linear_flops", "attention_flops", "intra_node_bw", "inter_node_bw",
            "latency_s", "group_overhead_s")
GIB = 2**30


def device_path(name: str) -> Path:
    """The device file named by ``flexsp.cost_model``: a shipped name or a path."""
    if name in SHIPPED:
        return DEFAULTS_DIR / f"{name}.json"
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"flexsp.cost_model={name!r} is neither a shipped device ({', '.join(SHIPPED)}) nor an "
                         f"existing file ({path.resolve()}); write one with tools/calibrate_flexsp.py")
    return path


def load_device(name: str) -> dict:
    """Read and check a device file; errors name ``flexsp.cost_model`` and the file."""
    path = device_path(name)
    try:
        device = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"flexsp.cost_model={name!r}: cannot read {path}: {e}") from None
    if not isinstance(device, dict):
        raise ValueError(f"flexsp.cost_model={name!r}: {path} must hold a JSON object")
    missing = [k for k in REQUIRED if k not in device]
    if missing:
        raise ValueError(f"flexsp.cost_model={name!r}: {path} lacks {', '.join(missing)} (needs {', '.join(REQUIRED)})")
    for key in REQUIRED:
        value = device[key]
        positive = key not in ("latency_s", "group_overhead_s")
        if not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
            raise ValueError(f"flexsp.cost_model={name!r}: {path} has {key}={value!r}; expected a "
                             f"{'positive' if positive else 'non-negative'} number")
    for key in ("alltoall_bw", "p2p_bw"):  # measured tables: {"group size": bytes/s}
        table = device.get(key) or {}
        if not isinstance(table, dict) or any(not str(k).isdigit() or v <= 0 for k, v in table.items()):
            raise ValueError(f"flexsp.cost_model={name!r}: {path} has {key}={table!r}; expected "
                             "{\"<group size>\": <bytes/s>, …}")
    device["path"] = str(path)
    return device


def model_fingerprint(model, tp: int, bf16: bool, recompute: str) -> dict:
    """What measured α depend on: the layer shapes, tp, the dtype and the recompute policy."""
    return {"num_layers": model.num_layers, "hidden_size": model.hidden_size,
            "ffn_hidden_size": model.ffn_hidden_size, "num_attention_heads": model.num_attention_heads,
            "num_query_groups": model.num_query_groups, "head_dim": model.head_dim,
            "vocab_size": model.vocab_size, "tp": tp, "bf16": bool(bf16), "recompute": recompute}


def recipe_passes(recompute: str) -> dict:
    """Forward-equivalents of a training step: linear layers (fwd 1 + bwd 2), attention (fwd 1 +
    bwd 2.5: five matmuls against two), all-to-all passes and ring K/V forward passes, each plus
    one where ``train.recompute`` runs that part's forward again."""
    lin_again = recompute in ("full", "attention-cached")
    attn_again = recompute in ("full", "selective")
    return {"linear": 3 + lin_again, "attention": 3.5 + attn_again, "a2a": 2 + attn_again,
            "ring_fwd": 1 + attn_again}


def linear_flops_per_token(m, vocab: int) -> float:
    """Forward FLOPs of the linear layers per token (2 per multiply-add), the output layer included."""
    qkv = 2 * m.hidden_size * (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim
    proj = 2 * m.num_attention_heads * m.head_dim * m.hidden_size
    mlp = 6 * m.hidden_size * m.ffn_hidden_size  # gate, up, down
    return m.num_layers * (qkv + proj + mlp) + 2 * m.hidden_size * vocab


def attention_flops_coef(m) -> float:
    """Forward FLOPs of causal attention of one sequence = coef·s² (QKᵀ and PV, half the square)."""
    return m.num_layers * 2 * m.num_attention_heads * m.head_dim


def num_parameters(m, vocab: int) -> int:
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim
    layer = (m.hidden_size * qkv + (qkv if m.add_qkv_bias else 0) + m.num_attention_heads * m.head_dim * m.hidden_size
             + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size + (2 * m.head_dim if m.qk_layernorm else 0))
    embed = vocab * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * layer + embed + m.hidden_size


def activation_bytes_per_token(m, tp: int, elem: int, recompute: str, vocab: int) -> float:
    """Bytes one rank keeps for backward per token it holds (estimate of what the layers save):
    per layer 4h (norm inputs/outputs) + 3(H+G)·D (q, k, v, rotated q, k, attention output) + 4f
    (gate, up, silu, product) elements and the fp32 lse; ``full`` keeps only each layer's input
    plus one layer being recomputed, ``selective`` drops the attention core's output and lse,
    ``attention-cached`` keeps the layer input, the attention output and lse. Plus the final
    norm and the logits (with their fp32 softmax). TP shards all of it (sequence-parallel)."""
    layer = elem * (4 * m.hidden_size + 3 * (m.num_attention_heads + m.num_query_groups) * m.head_dim
                    + 4 * m.ffn_hidden_size) + 4 * m.num_attention_heads
    core = elem * m.num_attention_heads * m.head_dim + 4 * m.num_attention_heads
    x = elem * m.hidden_size
    kept = {"none": m.num_layers * layer, "full": m.num_layers * x + layer,
            "selective": m.num_layers * (layer - core) + core,
            "attention-cached": m.num_layers * (x + core) + layer}[recompute]
    head = elem * m.hidden_size + (elem + 4) * vocab
    return (kept + head) / tp


def model_state_bytes(num_params: int, bf16: bool, sharding: str, offload: bool, pool: int, tp: int) -> float:
    """Bytes of weights, gradients and optimizer state per GPU: bf16 keeps bf16 weights and
    gradients, fp32 main gradients, fp32 masters and Adam moments (engine.optim); fp32 keeps
    weights, gradients and moments. zero1 shards the optimizer part over the pool (dp×cp),
    fsdp2 everything; offload moves the optimizer part to host memory."""
    replicated = num_params * ((2 + 2 + 4) if bf16 else (4 + 4))
    optimizer = 0.0 if offload else num_params * ((4 + 8) if bf16 else 8)
    if sharding == "zero1":
        optimizer /= pool
    elif sharding == "fsdp2":
        replicated, optimizer = replicated / pool, optimizer / pool
    return (replicated + optimizer) / tp


def _lookup(table: dict, size: int, default: float) -> float:
    """A measured per-size bandwidth: this size, else the largest measured size below it (else the
    smallest measured), else ``default``."""
    if not table:
        return default
    sizes = sorted(int(k) for k in table)
    below = [k for k in sizes if k <= size]
    return float(table[str(below[-1] if below else sizes[0])])


def _is_pow2(n) -> bool:
    return isinstance(n, (int, np.integer)) and n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Predicted seconds of a group's sequences and the token limit per rank (see module doc)."""

    alpha1: float
    """Seconds per s² of one sequence's attention on one rank (fwd + bwd + recompute)."""
    alpha2: float
    """Seconds per token of the linear layers on one rank."""
    num_layers: int
    heads: int
    """Query heads per tp rank."""
    kv_heads: int
    """KV heads per tp rank."""
    head_dim: int
    elem_bytes: int
    passes: dict
    bytes_per_token: float
    """Activation bytes per token a rank holds (recipe estimate)."""
    states_bytes: float
    """Weights, gradients and optimizer state per GPU."""
    memory_bytes: float
    """Memory for activations + states per GPU."""
    token_cap: int
    """flexsp.max_tokens_per_rank (0: derive from memory)."""
    max_hp: int
    tp: int
    gpus_per_node: int
    device: dict
    alpha_source: str = "derived"

    @classmethod
    def from_config(cls, cfg) -> "CostModel":
        """Build from a (validated) ``engine.config.Config``: model, parallel.tp/hp/dp/cp,
        train.bf16/recompute, optim.sharding/offload, flexsp.*."""
        fx, m, p = cfg.flexsp, cfg.model, cfg.parallel
        device = load_device(fx.cost_model)
        bf16, recompute = bool(cfg.train.bf16), cfg.train.recompute
        passes = recipe_passes(recompute)
        vocab = -(-m.vocab_size // (m.make_vocab_size_divisible_by * p.tp)) * m.make_vocab_size_divisible_by * p.tp
        ratio = float(device.get("fp32_flops_ratio", 0.5))
        measured_in = device.get("flops_dtype", "bf16")
        scale = 1.0 if measured_in == ("bf16" if bf16 else "fp32") else (ratio if not bf16 else 1.0 / ratio)
        alpha1 = passes["attention"] * attention_flops_coef(m) / (device["attention_flops"] * scale * p.tp)
        alpha2 = passes["linear"] * linear_flops_per_token(m, vocab) / (device["linear_flops"] * scale * p.tp)
        source = "derived"
        if "alpha1" in device and "alpha2" in device:
            fingerprint = model_fingerprint(m, p.tp, bf16, recompute)
            if device.get("alpha_model") in (None, fingerprint):
                alpha1, alpha2, source = float(device["alpha1"]), float(device["alpha2"]), "measured"
        pool = max(1, p.dp) * p.cp
        elem = 2 if bf16 else 4
        mem_gb = fx.memory_gb if fx.memory_gb > 0 else device["memory_gb"] - device.get("reserved_gb", 0.0)
        return cls(alpha1=alpha1, alpha2=alpha2, num_layers=m.num_layers, heads=m.num_attention_heads // p.tp,
                   kv_heads=max(1, m.num_query_groups // p.tp), head_dim=m.head_dim, elem_bytes=elem, passes=passes,
                   bytes_per_token=activation_bytes_per_token(m, p.tp, elem, recompute, vocab),
                   states_bytes=model_state_bytes(num_parameters(m, vocab), bf16, cfg.optim.sharding,
                                                  cfg.optim.offload, pool, p.tp),
                   memory_bytes=mem_gb * GIB, token_cap=fx.max_tokens_per_rank, max_hp=max(1, p.hp), tp=p.tp,
                   gpus_per_node=fx.gpus_per_node, device=device, alpha_source=source)

    def with_max_hp(self, max_hp: int) -> "CostModel":
        """The same model with another Ulysses cap (a power of two)."""
        if not _is_pow2(max_hp):
            raise ValueError(f"max_hp={max_hp} must be a power of two >= 1 (parallel.hp)")
        return dataclasses.replace(self, max_hp=int(max_hp))

    # -- memory ---------------------------------------------------------------------------------
    def max_tokens_per_rank(self) -> int:
        """flexsp.max_tokens_per_rank when set, else (memory − model states) / bytes per token."""
        if self.token_cap > 0:
            return int(self.token_cap)
        free = self.memory_bytes - self.states_bytes
        tokens = int(free // self.bytes_per_token) if free > 0 else 0
        if tokens < 1:
            raise ValueError(f"flexsp.memory_gb: model states take {self.states_bytes / GIB:.1f} GiB of the "
                             f"{self.memory_bytes / GIB:.1f} GiB per GPU, leaving no room for activations; raise "
                             "flexsp.memory_gb, shard the optimizer (optim.sharding) or set flexsp.max_tokens_per_rank")
        return tokens

    # -- time -----------------------------------------------------------------------------------
    def degrees(self, d: int) -> tuple[int, int]:
        """(hp, rp) of a group of d ranks."""
        if not _is_pow2(d):
            raise ValueError(f"group size d={d} must be a power of two >= 1")
        hp = min(int(d), self.max_hp)
        return hp, int(d) // hp

    def _ranks_per_node(self) -> int:
        return max(1, self.gpus_per_node // self.tp)

    def _a2a_seconds_per_byte(self, hp: int) -> float:
        """Seconds per byte leaving a rank in an all-to-all of hp ranks (adjacent ranks): the
        on-node and off-node shares travel concurrently; the slower one sets the time."""
        dev, on_node = self.device, min(hp, self._ranks_per_node())
        intra = _lookup(dev.get("alltoall_bw", {}), on_node, dev["intra_node_bw"])
        on_share, off_share = (on_node - 1) / (hp - 1), (hp - on_node) / (hp - 1)
        return max(on_share / intra, off_share / dev["inter_node_bw"])

    def _ring_seconds_per_byte(self, d: int, rp: int) -> float:
        """A ring step waits for its slowest hop: inter-node once the group leaves a node."""
        dev = self.device
        if d > self._ranks_per_node():
            return 1.0 / dev.get("p2p_inter_bw", dev["inter_node_bw"])
        return 1.0 / _lookup(dev.get("p2p_bw", {}), rp, dev.get("p2p_intra_bw", dev["intra_node_bw"]))

    def _a2a_bytes_per_token(self, hp: int) -> float:
        """Bytes of q, k, v and the output per token over all layers and passes (KV heads fewer
        than hp travel replicated, engine.parallel.context.ulysses)."""
        width = 2 * self.heads + 2 * max(self.kv_heads, hp)
        return self.num_layers * self.passes["a2a"] * width * self.head_dim * self.elem_bytes

    def _ring_bytes_per_token(self, hp: int) -> float:
        """Bytes per token of a ring block over all layers: K/V in each forward pass, K/V again
        and the fp32 dK/dV in backward; only the real KV heads of this hp rank travel."""
        kv = 2 * max(self.kv_heads, hp) / hp * self.head_dim
        return self.num_layers * kv * (self.passes["ring_fwd"] * self.elem_bytes + self.elem_bytes + 4)

    def overhead(self, d: int) -> float:
        """β_d: fixed seconds of a non-empty group per micro-batch (device overhead + latencies)."""
        hp, rp = self.degrees(d)
        dev, nodes = self.device, self._ranks_per_node()
        inter_lat = dev.get("inter_latency_s", dev["latency_s"])
        beta = dev["group_overhead_s"]
        if hp > 1:
            beta += self.num_layers * 4 * self.passes["a2a"] * (dev["latency_s"] if hp <= nodes else inter_lat)
        if rp > 1:  # a K/V exchange per ring step in each forward pass, K/V and dK/dV ones in backward
            lat = dev["latency_s"] if d <= nodes else inter_lat
            beta += self.num_layers * (rp - 1) * (self.passes["ring_fwd"] + 2) * lat
        return beta

    def seq_times(self, lengths, d: int) -> np.ndarray:
        """Seconds each sequence adds to a group of d ranks (β_d not included)."""
        hp, rp = self.degrees(d)
        s = np.asarray(lengths, dtype=np.float64)
        if d > 1:  # I-3: documents padded to a multiple of 2·d
            s = np.ceil(s / (2 * d)) * (2 * d)
        attention = self.alpha1 * s * s / d
        t = attention + self.alpha2 * s / d
        if hp > 1:
            t = t + (s / d) * self._a2a_bytes_per_token(hp) * (hp - 1) / hp * self._a2a_seconds_per_byte(hp)
        if rp > 1:
            ring = (rp - 1) * (s / rp) * self._ring_bytes_per_token(hp) * self._ring_seconds_per_byte(d, rp)
            t = t + np.maximum(0.0, ring - attention)
        return t

    def group_time(self, lengths, d: int) -> float:
        """Seconds of one group of d ranks holding these sequences (0 for an empty group)."""
        if len(lengths) == 0:
            self.degrees(d)
            return 0.0
        return float(self.seq_times(lengths, d).sum()) + self.overhead(d)

    def describe(self) -> dict:
        """The derived constants, for logs and benchmark headers."""
        return {"device": self.device.get("name", self.device["path"]), "alpha1": self.alpha1, "alpha2": self.alpha2,
                "alpha_source": self.alpha_source, "bytes_per_token": self.bytes_per_token,
                "states_gib": self.states_bytes / GIB, "memory_gib": self.memory_bytes / GIB, "max_hp": self.max_hp}


__all__ = ["CostModel", "load_device", "device_path", "model_fingerprint", "recipe_passes", "linear_flops_per_token",
           "attention_flops_coef", "num_parameters", "activation_bytes_per_token", "model_state_bytes"]
