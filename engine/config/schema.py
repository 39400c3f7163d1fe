"""The configuration schema: typed dataclasses, a docstring under every field."""

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A mistake in the config file or on the command line; the message says the fix."""


@dataclass
class ModelConfig:
    arch: str = "llama"
    """Model family: "llama", "qwen2", "qwen3" or "mistral"."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    ffn_hidden_size: int = 176
    """Width of the SwiGLU MLP (each of gate and up)."""
    num_attention_heads: int = 8
    """Number of query heads."""
    num_query_groups: int = 4
    """Number of key/value heads (GQA); equal to num_attention_heads for plain multi-head."""
    kv_channels: int | None = None
    """Head dimension (HF ``head_dim``); None means hidden_size // num_attention_heads. Qwen3 sets it
    explicitly (128 for every size, which differs from hidden_size // heads for 0.6B and 4B)."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times tp."""
    norm_epsilon: float = 1e-5
    """Epsilon of RMSNorm."""
    rotary_base: float = 10000.0
    """RoPE base frequency (HF: rope_theta)."""
    rope_scaling: dict | None = None
    """Llama-3 RoPE scaling: {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}; None for plain RoPE."""
    add_qkv_bias: bool = False
    """Bias on the q, k, v projections (Qwen2 uses it)."""
    qk_layernorm: bool = False
    """RMSNorm (eps norm_epsilon, a weight of head_dim) on every query and key head after the QKV
    projection and before RoPE (Qwen3; megatron-core's ``qk_layernorm``, weights
    ``self_attention.q_layernorm.weight`` / ``k_layernorm.weight``, replicated over tp). Required by
    arch "qwen3"; Hugging Face export writes it only as a qwen3 model."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    max_position_embeddings: int = 4096
    """Longest position the model is meant for (recorded in checkpoints)."""
    sliding_window: int | None = None
    """Mistral's attention window in tokens (HF ``sliding_window``); None: full causal attention.
    meshtron's attention is full causal, which equals the window's for documents no longer than
    it, so ``data.seq_len`` above the window is refused rather than silently changing the model."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    load: str | None = None
    """Checkpoint directory to load weights from; None starts from random weights."""

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    dp: int = -1
    """Data-parallel degree; -1 uses the ranks left over by tp, pp and cp."""
    tp: int = 1
    """Tensor-parallel degree (with sequence-parallel activations)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    cp: int = 1
    """Context-parallel degree, hp * rp."""
    hp: int = 1
    """Head-parallel (Ulysses) degree inside cp; the ring degree is rp = cp // hp."""
    sp_mode: str = "ring"
    """Context-parallel attention when cp > 1: "ring" (zigzag ring over all cp ranks, hp = 1),
    "ulysses" (all-to-all over all cp ranks, hp = cp) or "hybrid" (hp-way Ulysses × cp/hp-way
    ring: LoongTrain's 2D attention)."""
    ring_window: int = 0
    """Double ring: inner rings of this many ring ranks, with the outer exchange overlapped;
    0 = one ring of all rp ranks. Must divide rp."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: "1f1b", "interleaved" (parallel.vpp model chunks per rank) or "seq1f1b"
    (each micro-batch cut into parallel.seq_chunks sequence units)."""
    vpp: int = 1
    """Model chunks per pipeline rank (virtual pipeline stages) for the interleaved schedule."""
    seq_chunks: int = 1
    """Seq1F1B: sequence units per micro-batch."""
    seq_partition: str = "compute"
    """Seq1F1B unit boundaries: "uniform" (equal tokens) or "compute" (equal attention+MLP FLOPs)."""
    layers_per_stage: list | None = None
    """Layers of every (virtual) pipeline stage in model order, e.g. [3, 5, 5, 3]; None splits
    evenly (first and last stage take fewer when uneven)."""
    placement: str = "head-first"
    """Inside cp, "head-first" puts the hp ranks next to each other, "context-first" the ring."""
    order: str = "tp-cp-dp-pp"
    """Order of the axes on the ranks, innermost (neighbouring ranks) first, joined by '-'."""

    @property
    def rp(self) -> int:
        return self.cp // self.hp


@dataclass
class OptimConfig:
    sharding: str = "none"
    """Optimizer-state sharding over dp×cp: "none", "zero1" (distributed optimizer: each rank keeps
    and updates its shard of the fp32 master weights and Adam moments) or "fsdp2" (torch's
    ``fully_shard`` of parameters, gradients and optimizer states)."""
    offload: bool = False
    """Keep the optimizer states (and fp32 master weights) in CPU memory: with sharding zero1 the
    optimizer's shard; with fsdp2 the parameter, gradient and optimizer-state shards (torch's
    ``CPUOffloadPolicy``; the optimizer step runs on the CPU)."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 2
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    grad_bucket_size: int = 40_000_000
    """Elements per fp32 gradient bucket (megatron-core's DDP bucket_size): a bucket's dp×cp
    reduction starts as soon as backward has completed its gradients, overlapping the rest of
    backward. Smaller buckets start earlier; larger ones use the network better."""


@dataclass
class TrainConfig:
    steps: int = 10
    """Number of optimizer steps."""
    seed: int = 1234
    """Seed of weights initialisation and synthetic data."""
    output_dir: str = "runs/default"
    """Where metrics, the resolved config and checkpoints are written."""
    global_batch_size: int = 8
    """Sequences per optimizer step, the same for every mesh."""
    micro_batch_size: int = 1
    """Sequences per micro-batch on each dp rank."""
    bf16: bool = False
    """bf16 parameters and activations with fp32 master weights."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    tensorboard: bool | None = None
    """TensorBoard scalars in ``<output_dir>/tensorboard``: true needs the tensorboard package
    (``pip install 'meshtron[tensorboard]'``), false writes none, null writes them when it is installed."""
    wandb_project: str | None = None
    """Also log the metrics to this Weights & Biases project, from global rank 0 (Megatron's
    --wandb-project, LLaMA-Factory's report_to: wandb); needs ``pip install 'meshtron[wandb]'``.
    null: no wandb."""
    wandb_mode: str = "offline"
    """Where wandb sends the run: "offline" (training nodes often have no network; upload later
    with ``wandb sync <output_dir>/wandb``) or "online" (needs ``wandb login`` or WANDB_API_KEY)."""
    max_bad_steps: int = 5
    """A step whose loss or gradient norm is NaN/Inf is skipped (no update) and counted; after this
    many consecutive skipped steps the run stops with an error (0: never stop)."""
    recompute: str = "none"
    """Activation checkpointing: "none", "full" (recompute each layer in backward), "selective"
    (recompute attention's core only) or "attention-cached" (keep attention's output and lse,
    recompute the rest of the layer: LoongTrain's Selective Checkpoint++)."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk of the fused output layer + vocab-parallel cross-entropy: the logits
    ``[T, V/tp]`` and their gradient exist one chunk at a time (recomputed in backward), never
    whole. 0: the unfused path (whole logits, the reference it is tested against). Default measured
    with tools/bench_memory.py's shapes (8,192 tokens, hidden 512, vocab 128,256, 1 thread): a step
    of the head takes 43 s at 1,024, 56 s at 2,048, 80 s at 4,096 and 66 s unfused (smaller
    chunks stay in cache; the recompute costs less than it saves); on a GPU a 1,024 × H × V/tp
    product is still large enough to fill the device."""
    tile_mlp: int = 1
    """Run each MLP over this many token tiles with recomputation inside (ALST's TiledMLP), so the
    ``[T, ffn/tp]`` intermediates exist one tile at a time, in forward and backward. 1: untiled."""
    offload_activations: bool = False
    """Move what each layer keeps for backward (with recompute=full, its input) to pinned host
    memory on a side stream, prefetched one layer ahead in backward."""
    offload_keep_layers: int = 0
    """With offload_activations: the first this many layers of each model chunk keep their
    checkpoints on the GPU (use the GPU memory there is before the PCIe link)."""
    resume: str = "none"
    """Resume from a checkpoint: "auto" (the latest in checkpoint.dir, if any), a checkpoint
    path, or "none". Restores weights, optimizer, schedule, data position and RNG."""


@dataclass
class DataConfig:
    source: str = "synthetic"
    """Where sequences come from: "synthetic" (generated), or "files" (``data.path``)."""
    path: str | list | None = None
    """Training data: a file, a glob, a directory or a list of them (JSON, JSONL, parquet, a
    ``datasets`` save_to_disk directory); with format=megatron an indexed-dataset prefix
    (``corpus_text_document`` for its .bin/.idx) or a blend ``[0.3, prefixA, 0.7, prefixB]``."""
    format: str = "auto"
    """Record format: conversations ("auto", "alpaca", "sharegpt", "messages" (OpenAI style)),
    "preference" (DPO), or token data: "megatron" (indexed .bin/.idx, pretrain), "tokenized"
    (records with input_ids and optionally labels or loss_mask, used as given), "text" (records
    with a text field, pretrain) or "hf" (a save_to_disk directory; its columns decide).
    engine/data/formats.py has the table."""
    cross_document_attention: bool = False
    """recipe=pretrain: false (default) keeps document boundaries — each document attends only
    to itself and its positions restart (Megatron's --reset-attention-mask --reset-position-ids);
    true trains on plain concatenation (one causal sequence across documents)."""
    tokenizer: str | None = None
    """Directory of a Hugging Face tokenizer (with a chat template); None = the checkpoint's hf/ folder."""
    cache: bool = True
    """Tokenize conversation and preference records once into a memory-mapped cache (keyed by the
    files, the tokenizer and these settings; built in parallel by the ranks of a node) that every
    later start reads; false tokenizes at every start (engine/data/cache.py)."""
    cache_dir: str | None = None
    """Where the data cache lives; None = $MESHTRON_CACHE_DIR/data or ~/.cache/meshtron/data.
    Point it at a shared file system to build once for every node."""
    skip_bad_records: bool = False
    """Skip malformed records (and report how many) instead of stopping at the first one."""
    overflow: str = "error"
    """A sample longer than seq_len: "error", "truncate" or "drop" (counted)."""
    seq_len: int = 256
    """Tokens per packed sequence (LLaMA-Factory: cutoff_len); the longest sequence when pack is false."""
    pack: bool = True
    """Pack documents into bins of seq_len tokens; false: every sequence is one document (synthetic:
    a long-tailed length between min_doc_len and max_doc_len), as sp_mode=flexsp wants."""
    min_doc_len: int = 8
    """Shortest synthetic document, in tokens."""
    max_doc_len: int = 200
    """Longest synthetic document, in tokens."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """Process-group backend: "auto" (nccl when CUDA is available, else gloo), "gloo" or "nccl"."""
    timeout_s: float = 300.0
    """Collective timeout in seconds: the longest any rank waits for a silent (hung or lost) peer."""
    abort_poll_s: float = 1.0
    """A rank that fails tells the others through the rendezvous store; they check this often and
    exit non-zero within about this many seconds of the failure."""


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Where checkpoints go (iter_NNNNNNN folders); None = train.output_dir/checkpoints."""
    format: str = "torch_dist"
    """On-disk format of training checkpoints: "torch_dist" (Megatron's distributed checkpoint:
    every rank writes its own shards in parallel; loads at any mesh) or "torch" (Megatron-LM's
    legacy mp_rank_TT[_PPP]/model_optim_rng.pt files, one per (tp, pp) rank, for older tooling;
    meshtron still resumes it at any mesh). See engine/resume.py."""
    every: int = 0
    """Save a checkpoint every this many optimizer steps (0: only the final one)."""
    keep: int = 3
    """Keep the last this many checkpoints of this run (0: keep all); checkpoints of other runs
    in the same directory are never removed."""
    save_final: bool = True
    """Save a checkpoint after the last step."""
    export_hf: str | None = None
    """After the last step, also write the model as a Hugging Face directory here."""


@dataclass
class DPOConfig:
    beta: float = 0.1
    """Strength of the KL anchor to the reference model."""
    loss_type: str = "sigmoid"
    """"sigmoid" (with label_smoothing), "ipo" or "hinge"."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a preference label is flipped (sigmoid only)."""
    sft_weight: float = 0.0
    """Weight of an added SFT term on the chosen responses (mean token NLL)."""
    precompute_reference: bool = False
    """Compute the frozen reference's per-sequence log-prob sums in one forward-only pass over the
    data before training (TRL's precompute_ref_log_probs) and cache them on disk, so training holds
    no reference weights. The cache is keyed by the data files and the reference weights."""
    reference_cache: str | None = None
    """Directory of the precomputed reference log-probs (default: <train.output_dir>/reference_logps)."""


@dataclass
class FlexSPConfig:
    cost_model: str = "h100"
    """Constants of the cost model: "a100", "h100" (shipped defaults) or a JSON file written by
    tools/calibrate_flexsp.py on the machine at hand."""
    memory_gb: float = 0.0
    """Memory limit per device in GiB for activations + model states; 0 = the cost model's device memory."""
    max_tokens_per_rank: int = 0
    """Hard cap on the tokens one rank holds in a micro-batch; 0 = derived from memory_gb."""
    buckets: int = 16
    """Length buckets of the solver (dynamic programming over the sorted lengths)."""
    solver: str = "milp"
    """"milp" (scipy HiGHS, greedy fallback on timeout) or "greedy"."""
    solve_time_s: float = 5.0
    """Time limit of one MILP solve; past it the best plan so far or the greedy one is used."""
    gpus_per_node: int = 8
    """Ranks per node: groups larger than this pay the inter-node bandwidth."""
    overlap: bool = True
    """Plan step i+1 on a background thread while step i trains."""


@dataclass
class HardwareConfig:
    gpus: int = 0
    """GPUs of the run, i.e. the world size (meshtron-plan and --simulate read it; 0 = not stated,
    and parallel.dp then has to be given). Training uses the world torchrun launches."""
    gpu: str = "h100"
    """The GPU the config is meant for: "a100", "a800", "h100" or "h200" (memory, FLOP/s and
    bandwidths of meshtron-plan, engine/plan/devices.py)."""
    gpu_memory_gb: float = 0.0
    """Memory of one GPU in GiB; 0 = that of hardware.gpu."""
    gpus_per_node: int = 8
    """GPUs per node (the intra-node bandwidth and the host memory are per node)."""
    host_memory_gb: float = 2048.0
    """Host (CPU) memory per node in GiB, for offloaded states."""


@dataclass
class Config:
    recipe: str = "sft"
    """What to train: "sft" (token cross-entropy on the responses), "dpo" (preference pairs) or
    "pretrain" (next-token loss on every token of a token stream packed into data.seq_len)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Degrees and layout of the device mesh."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data pipeline."""
    dist: DistConfig = field(default_factory=DistConfig)
    """torch.distributed settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, loading and exporting weights."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO loss (recipe: dpo)."""
    flexsp: FlexSPConfig = field(default_factory=FlexSPConfig)
    """The FlexSP planner (parallel.sp_mode: flexsp)."""
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    """The machines the config is meant for (meshtron-plan, meshtron-plan --simulate)."""


# Keys of other tools (LLaMA-Factory) accepted at the top level of the YAML and as overrides
# without a section -> the dotted key they set, or a function (raw_nested_dict, value) -> None
# for keys that map onto several fields; such a function raises ConfigError itself when the
# dict already holds a different value. A dotted key on the command line wins over a function.
