"""Pipeline parallelism: stage split (``engine.model.sharding.stage_layers``), schedules
(1F1B, interleaved, Seq1F1B) as per-rank action lists, one runtime that executes them with tagged
non-blocking point-to-point messages, Seq1F1B's sequence units with their K/V cache, and the
compute-balanced sequence partition."""
