"""Pipeline parallelism: stage split (``engine.model.sharding.stage_layers``), schedules
(1F1B, interleaved, Seq1F1B) as per-rank action lists with their communication plan (one p2p
batch per step, deadlock-free under NCCL's rules), one runtime that executes them, Seq1F1B's
sequence units with their K/V cache, and the compute-balanced sequence partition."""
