"""`validate`: the checks that need the world size or span several fields, with the fix in the message."""

import dataclasses

from engine.config.schema import Config, ConfigError, ModelConfig, ParallelConfig

_AT_LEAST_ONE = ("model.num_layers", "model.hidden_size", "model.ffn_hidden_size",
                 "model.num_attention_heads", "model.num_query_groups", "model.vocab_size",
                 "model.make_vocab_size_divisible_by", "model.max_position_embeddings",
                 "parallel.tp", "parallel.pp", "parallel.cp", "parallel.hp", "train.steps",
                 "train.global_batch_size", "train.micro_batch_size", "train.log_interval", "train.tile_mlp",
                 "optim.grad_bucket_size", "hardware.gpus_per_node")
_POSITIVE = ("model.norm_epsilon", "model.rotary_base", "model.init_method_std", "optim.lr",
             "optim.eps", "dist.timeout_s", "dist.abort_poll_s")
_NON_NEGATIVE = ("train.max_bad_steps", "train.loss_chunk_tokens", "train.offload_keep_layers", "optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.clip_grad",
                 "hardware.gpus", "hardware.gpu_memory_gb", "hardware.host_memory_gb",
                 "checkpoint.every", "checkpoint.keep")
_CHOICES = {"recipe": ("sft", "dpo", "pretrain"), "dpo.loss_type": ("sigmoid", "ipo", "hinge"), "model.arch": ("llama", "qwen2", "qwen3", "mistral"), "data.source": ("synthetic", "files"),
            "data.format": ("auto", "alpaca", "sharegpt", "messages", "preference", "megatron", "tokenized",
                            "text", "hf"),
            "data.overflow": ("error", "truncate", "drop"),
            "parallel.placement": ("head-first", "context-first"),
            "parallel.sp_mode": ("ring", "ulysses", "hybrid", "flexsp"),
            "train.recompute": ("none", "full", "selective", "attention-cached"),
            "train.wandb_mode": ("offline", "online"),
            "optim.sharding": ("none", "zero1", "fsdp2"), "flexsp.solver": ("milp", "greedy"),
            "checkpoint.format": ("torch_dist", "torch"),
            "parallel.pp_schedule": ("1f1b", "interleaved", "seq1f1b"),
            "parallel.seq_partition": ("uniform", "compute"),
            "dist.backend": ("auto", "gloo", "nccl"), "hardware.gpu": ("a100", "a800", "h100", "h200")}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def validate(cfg: Config, world_size: int, files: bool = True) -> Config:
    """Check `cfg` for `world_size` ranks; return a copy with `parallel.dp` resolved. ``files=False``
    skips the checks that data, tokenizer and checkpoint paths exist (``meshtron-plan --simulate``
    reads none of them, so a cluster's config is simulated anywhere)."""
    assert world_size >= 1, world_size
    _check_values(cfg)
    cfg = dataclasses.replace(cfg, parallel=_resolve_sp_mode(cfg.parallel))
    _check_model(cfg.model, cfg.parallel)  # before the world size: a model-vs-degree error is the root cause
    dp = _resolve_dp(cfg.parallel, world_size)
    _check_batch_and_data(cfg, dp)
    _check_window(cfg)
    _check_pipeline(cfg, dp)
    _check_optim(cfg)
    _check_checkpoint(cfg)
    _check_paths(cfg, files)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp))


def _check_window(cfg: Config) -> None:
    """No silent change of a model's attention (Mistral's sliding window)."""
    window = cfg.model.sliding_window
    if window is not None and cfg.data.seq_len > window:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.sliding_window={window}: meshtron's "
                          f"attention is full causal, which equals the model's windowed attention only for "
                          f"sequences of at most {window} tokens; use data.seq_len<={window}")


def _check_values(cfg: Config) -> None:
    def value(key):
        if "." not in key:
            return getattr(cfg, key)
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, allowed in _CHOICES.items():
        if value(key) not in allowed:
            raise ConfigError(f"{key}={value(key)!r} is not supported; use {key}={_list(allowed)}")
    for keys, rule, ok in ((_AT_LEAST_ONE, ">= 1", lambda v: v >= 1),
                           (_POSITIVE, "> 0", lambda v: v > 0),
                           (_NON_NEGATIVE, ">= 0", lambda v: v >= 0),
                           (("optim.beta1", "optim.beta2"), "in [0, 1)", lambda v: 0 <= v < 1)):
        for key in keys:
            if not ok(value(key)):
                raise ConfigError(f"{key}={value(key)} must be {rule}")
    if cfg.model.kv_channels is not None and cfg.model.kv_channels < 1:
        raise ConfigError(f"model.kv_channels={cfg.model.kv_channels} must be >= 1, or null")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}; "
                          f"lower min_lr or raise lr")
    p = cfg.parallel
    if p.dp < 1 and p.dp != -1:
        raise ConfigError(f"parallel.dp={p.dp} must be >= 1, or -1 for the ranks left over")
    if sorted(p.order.split("-")) != ["cp", "dp", "pp", "tp"]:
        raise ConfigError(f"parallel.order={p.order!r} must name each of tp, cp, dp, pp once, "
                          f"joined by '-', innermost first, e.g. 'tp-cp-dp-pp'")
    if p.cp % p.hp:
        raise ConfigError(f"parallel.hp={p.hp} does not divide parallel.cp={p.cp}; use "
                          f"parallel.hp={_list(_divisors(p.cp))}")


def _resolve_sp_mode(p: ParallelConfig) -> ParallelConfig:
    """hp follows from sp_mode: ring -> 1, ulysses -> cp, hybrid -> given (1 < hp < cp)."""
    if p.sp_mode == "ring":
        if p.hp != 1:
            raise ConfigError(f"parallel.sp_mode=ring uses hp=1 but parallel.hp={p.hp}; use "
                              f"parallel.sp_mode=hybrid for hp x ring, or drop parallel.hp")
        hp = 1
    elif p.sp_mode == "ulysses":
        if p.hp not in (1, p.cp):
            raise ConfigError(f"parallel.sp_mode=ulysses uses hp=cp={p.cp} but parallel.hp={p.hp}; "
                              f"use parallel.sp_mode=hybrid for hp x ring, or drop parallel.hp")
        hp = p.cp
    elif p.sp_mode == "flexsp":  # hp: the largest Ulysses degree of a group (the rest is ring)
        if p.pp > 1:
            raise ConfigError(f"parallel.sp_mode=flexsp runs without pipeline stages; got parallel.pp={p.pp}, "
                              f"use pp=1 (or another sp_mode)")
        if p.cp & (p.cp - 1) or p.hp & (p.hp - 1):
            raise ConfigError(f"parallel.sp_mode=flexsp needs parallel.cp and parallel.hp powers of two "
                              f"(got cp={p.cp}, hp={p.hp}): groups have sizes 2^i")
        hp = p.hp
    else:
        if p.cp > 1 and not 1 < p.hp < p.cp:
            valid = [h for h in _divisors(p.cp) if 1 < h < p.cp]
            fix = (f"use parallel.hp={_list(valid)}" if valid else
                   "hybrid needs cp >= 4 (hp and rp both > 1)")
            raise ConfigError(f"parallel.sp_mode=hybrid needs 1 < parallel.hp < parallel.cp={p.cp}, "
                              f"got hp={p.hp}; {fix}, or use parallel.sp_mode=ring or ulysses")
        hp = p.hp
    rp = p.cp // hp if p.cp % hp == 0 else 0
    if p.ring_window and (rp == 0 or rp % p.ring_window or p.ring_window < 1):
        raise ConfigError(f"parallel.ring_window={p.ring_window} does not divide the ring degree "
                          f"rp={rp}; use parallel.ring_window={_list([0] + _divisors(rp)) if rp else 0}")
    return dataclasses.replace(p, hp=hp)


def _resolve_dp(p: ParallelConfig, world_size: int) -> int:
    inner = p.tp * p.pp * p.cp
    if world_size % inner:
        raise ConfigError(f"world size {world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*"
                          f"{p.cp} = {inner}; change parallel.tp, pp or cp, or run on a multiple "
                          f"of {inner} ranks")
    if p.dp != -1 and p.dp * inner != world_size:
        raise ConfigError(f"tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} = {inner * p.dp} does not "
                          f"match world size {world_size}; set parallel.dp={world_size // inner} "
                          f"(or -1)")
    return world_size // inner


def _check_model(m: ModelConfig, p: ParallelConfig) -> None:
    heads, groups = m.num_attention_heads, m.num_query_groups
    if heads % groups:
        raise ConfigError(f"model.num_query_groups={groups} does not divide "
                          f"model.num_attention_heads={heads}; "
                          f"use model.num_query_groups={_list(_divisors(heads))}")
    if heads % p.tp or groups % p.tp:
        name, n = ("num_attention_heads", heads) if heads % p.tp else ("num_query_groups", groups)
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.{name}={n}; use "
                          f"parallel.tp={_list(_divisors(groups))}"
                          + (f" (tp must divide both num_attention_heads={heads} and "
                             f"num_query_groups={groups})" if groups != heads else ""))
    local_groups = groups // p.tp
    if p.hp > 1 and local_groups % p.hp and p.hp % local_groups:
        ok = [h for h in _divisors(p.cp) if local_groups % h == 0 or h % local_groups == 0]
        raise ConfigError(f"model.num_query_groups={groups} over tp={p.tp} leaves {local_groups} KV "
                          f"heads per rank, which neither divides nor is a multiple of hp={p.hp}; "
                          f"{_hp_advice(p, ok)}")
    if heads % (p.tp * p.hp):
        ok = [h for h in _divisors(p.cp) if heads % (p.tp * h) == 0]
        raise ConfigError(f"tp*hp = {p.tp}*{p.hp} = {p.tp * p.hp} does not divide "
                          f"model.num_attention_heads={heads}; with tp={p.tp}, cp={p.cp} {_hp_advice(p, ok)}")
    if p.pp > m.num_layers:
        raise ConfigError(f"parallel.pp={p.pp} is more than model.num_layers={m.num_layers}; use "
                          f"pp <= {m.num_layers}")
    if m.arch == "qwen3" and (not m.qk_layernorm or m.add_qkv_bias):
        raise ConfigError(f"model.arch=qwen3 normalises q and k per head and has no q/k/v bias (got "
                          f"qk_layernorm={m.qk_layernorm}, add_qkv_bias={m.add_qkv_bias}); set "
                          f"model.qk_layernorm=true and model.add_qkv_bias=false")
    if m.kv_channels is None and m.hidden_size % heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={heads}; set model.kv_channels or use "
                          f"model.hidden_size={_list(_near_multiples(m.hidden_size, heads))}")
    rs = m.rope_scaling
    if rs is not None and rs.get("rope_type") != "llama3":
        raise ConfigError(f"model.rope_scaling.rope_type={rs.get('rope_type')!r} is not supported; "
                          f"use 'llama3', or model.rope_scaling=null")
    bad = [k for k in _LLAMA3_KEYS if rs is not None and
           (isinstance(rs.get(k), bool) or not isinstance(rs.get(k), int | float))]
    if bad:
        raise ConfigError(f"model.rope_scaling with rope_type 'llama3' needs a number for each "
                          f"of {', '.join(bad)}")


def _hp_advice(p: ParallelConfig, ok: list[int]) -> str:
    """How to get a head-parallel degree in ``ok``: hp itself, or the sp_mode that sets it."""
    if p.sp_mode == "ulysses":  # hp = cp is implied; ring (hp = 1) always divides
        hybrid = [h for h in ok if 1 < h < p.cp]
        return ("use parallel.sp_mode=ring" + (f", or parallel.sp_mode=hybrid with parallel.hp={_list(hybrid)}"
                                                if hybrid else "") + " (ulysses puts all cp ranks on heads)")
    if p.sp_mode == "hybrid" and not [h for h in ok if 1 < h < p.cp]:
        return "use parallel.sp_mode=ring (no hybrid split of these heads exists)"
    if p.sp_mode == "hybrid":
        return f"use parallel.hp={_list([h for h in ok if 1 < h < p.cp])}"
    return f"use parallel.hp={_list(ok)}"


def _check_pipeline(cfg: Config, dp: int) -> None:
    p, m = cfg.parallel, cfg.model
    if p.vpp < 1 or p.seq_chunks < 1:
        raise ConfigError(f"parallel.vpp={p.vpp} and parallel.seq_chunks={p.seq_chunks} must be >= 1")
    if p.vpp > 1 and p.pp_schedule != "interleaved":
        raise ConfigError(f"parallel.vpp={p.vpp} needs parallel.pp_schedule=interleaved")
    if p.pp_schedule == "interleaved":
        if p.pp < 2 or p.vpp < 2:
            raise ConfigError(f"parallel.pp_schedule=interleaved needs pp >= 2 and vpp >= 2 "
                              f"(got pp={p.pp}, vpp={p.vpp})")
        per_rank = cfg.train.global_batch_size // (dp * cfg.train.micro_batch_size)
        if per_rank % p.pp:
            raise ConfigError(f"parallel.pp_schedule=interleaved needs the micro-batches per dp rank "
                              f"({per_rank}) to be a multiple of pp={p.pp}; change "
                              f"train.global_batch_size or train.micro_batch_size")
    if p.seq_chunks > 1 and p.pp_schedule != "seq1f1b":
        raise ConfigError(f"parallel.seq_chunks={p.seq_chunks} needs parallel.pp_schedule=seq1f1b")
    stages = p.pp * p.vpp
    if p.layers_per_stage is not None:
        lps = p.layers_per_stage
        if len(lps) != stages or sum(lps) != m.num_layers or min(lps) < 1:
            raise ConfigError(f"parallel.layers_per_stage={lps} must list {stages} positive numbers "
                              f"(pp*vpp) adding up to model.num_layers={m.num_layers}")
    elif m.num_layers % stages and (stages < 3 or m.num_layers < stages):
        raise ConfigError(f"model.num_layers={m.num_layers} cannot be split over pp*vpp = {stages} "
                          f"stages; set parallel.layers_per_stage")


def _check_optim(cfg: Config) -> None:
    """Sharded optimizer states: the combinations that are not implemented."""
    o = cfg.optim
    if o.offload and o.sharding == "none":
        raise ConfigError("optim.offload=true needs optim.sharding=zero1 (the optimizer's shard in CPU memory) "
                          "or fsdp2 (parameter, gradient and optimizer-state shards in CPU memory); got 'none'")
    if o.sharding == "fsdp2" and cfg.train.bf16 and cfg.parallel.pp > 1:
        raise ConfigError("optim.sharding=fsdp2 with train.bf16=true keeps fp32 parameter shards (the masters), "
                          "but pipeline stages size their bf16 activation buffers from the parameter dtype; "
                          "use parallel.pp=1 or optim.sharding=zero1")


def _check_checkpoint(cfg: Config) -> None:
    """checkpoint.format=torch: one file per (tp, pp) rank, in a layout Megatron-LM can express."""
    if cfg.checkpoint.format != "torch":
        return
    if cfg.optim.sharding == "fsdp2":
        raise ConfigError("checkpoint.format=torch writes each (tp, pp) rank's whole weights into one file, which "
                          "under optim.sharding=fsdp2 means gathering them from the dp×cp shards; use "
                          "checkpoint.format=torch_dist (convert it later with meshtron-convert) or optim.sharding=zero1")
    from engine.model.sharding import stage_layers

    p = cfg.parallel
    stages = stage_layers(cfg.model.num_layers, p.pp, p.vpp, p.layers_per_stage)
    lps = [len(stages[v % p.pp][v // p.pp]) for v in range(p.pp * p.vpp)]
    per_rank = [sum(lps[c * p.pp + r] for c in range(p.vpp)) for r in range(p.pp)]
    chunks_equal = all(len({lps[c * p.pp + r] for c in range(p.vpp)}) == 1 for r in range(p.pp))
    if len(set(lps)) > 1 and (not chunks_equal or len(set(per_rank[1:-1])) > 1):
        raise ConfigError(f"checkpoint.format=torch: layers per stage {lps} cannot be expressed in Megatron-LM's "
                          f"args (all virtual chunks of a pp rank and all middle pp ranks need the same number "
                          f"of layers); use checkpoint.format=torch_dist or change parallel.layers_per_stage")


def _check_paths(cfg: Config, files: bool = True) -> None:
    """Inputs that must exist, checked before any process group or model is built (only the rules
    that need no file when ``files`` is False)."""
    import os

    if cfg.recipe == "dpo" and cfg.parallel.pp_schedule == "seq1f1b":
        raise ConfigError("recipe=dpo with parallel.pp_schedule=seq1f1b is not supported: DPO's loss is a "
                          "log-sigmoid of whole-sequence log-prob sums of a chosen/rejected pair, so no sequence "
                          "chunk's gradient is known before the pair's last chunk has run forward, which is what "
                          "Seq1F1B's chunk-by-chunk backward needs; use parallel.pp_schedule=1f1b or interleaved")
    if not files:
        return
    if cfg.model.load is not None and not os.path.isdir(cfg.model.load):
        raise ConfigError(f"model.load={cfg.model.load} does not exist; give a Megatron checkpoint directory "
                          f"or a Hugging Face model directory (config.json and safetensors weights)")
    if cfg.recipe == "dpo" and cfg.data.source != "files":
        raise ConfigError("recipe=dpo needs preference records: set data.source=files and data.path")
    if cfg.data.source == "files":
        _check_data_files(cfg)
    resume = cfg.train.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        raise ConfigError(f"train.resume={resume} does not exist; use auto, none or a checkpoint directory")
    _check_logging_packages(cfg)


def _check_data_files(cfg: Config) -> None:
    """``data.path`` exists (a Megatron prefix: its .bin and .idx) and a tokenizer is there when
    the format needs one (token formats other than text need none)."""
    import glob
    import os

    d = cfg.data
    if d.path is None:
        raise ConfigError("data.source=files needs data.path (a file, a glob or a list)")
    if cfg.recipe == "pretrain" and d.format in ("auto", "alpaca", "sharegpt", "messages", "preference"):
        raise ConfigError(f"recipe=pretrain reads a token stream; data.format={d.format} is conversation "
                          f"records — use data.format megatron, tokenized, text or hf")
    if d.format == "megatron":
        from engine.data.blend import parse_blend

        try:
            prefixes, _ = parse_blend(d.path)
        except ValueError as e:
            raise ConfigError(f"data.path: {e}") from None
        for prefix in prefixes:
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                raise ConfigError(f"data.path: no Megatron indexed dataset at prefix {prefix!r} (missing "
                                  f"{', '.join(missing)}); give the prefix without .bin/.idx, e.g. "
                                  f"corpus_text_document")
        return
    paths = d.path if isinstance(d.path, list) else [d.path]
    missing = [p for p in paths if not glob.glob(str(p))]
    if missing:
        raise ConfigError(f"data.path: nothing matches {missing}")
    if d.format == "tokenized" or (d.format == "hf" and cfg.recipe == "pretrain"):
        return  # token ids as given (an hf directory of text finds out when it reads its columns)
    from engine.config.hf_model import has_tokenizer_files, is_hf_model_dir, tokenizer_dir

    tok = tokenizer_dir(cfg)
    if tok is None or not os.path.isdir(tok):
        raise ConfigError(f"data.tokenizer={tok} is not a directory; give a Hugging Face tokenizer "
                          f"directory (or model.load of a converted checkpoint, whose hf/ folder has one, "
                          f"or of a Hugging Face model directory with its tokenizer files)")
    if tok == cfg.model.load and is_hf_model_dir(tok) and not has_tokenizer_files(tok):
        raise ConfigError(f"model.load={tok} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                          f"...) to default data.tokenizer to; set data.tokenizer to the model's tokenizer")


def _check_logging_packages(cfg: Config) -> None:
    """The optional logging packages a config asks for, checked on every rank before training (a
    missing one found by rank 0's logger alone would leave the other ranks waiting on it)."""
    import importlib.util

    if cfg.train.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project={cfg.train.wandb_project!r} needs wandb, which is not "
                          f"installed; pip install 'meshtron[wandb]' or unset train.wandb_project")
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard=true needs tensorboard, which is not installed; "
                          "pip install 'meshtron[tensorboard]' or set train.tensorboard=false")


def _check_batch_and_data(cfg: Config, dp: int) -> None:
    t, d, p = cfg.train, cfg.data, cfg.parallel
    per_step = dp * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"dp*micro_batch_size = {dp}*{t.micro_batch_size} = {per_step}; use "
                          f"train.global_batch_size="
                          f"{_list(_near_multiples(t.global_batch_size, per_step))}")
    if d.seq_len < 2:
        raise ConfigError(f"data.seq_len={d.seq_len} must be >= 2")
    # cp cuts every sequence into 2*cp zigzag chunks, then tp's sequence parallelism splits them
    # (unpacked sequences are padded per document instead).
    unit, why = (2 * p.cp * p.tp, f"2*cp*tp = 2*{p.cp}*{p.tp} = ") if p.cp > 1 else (p.tp, "tp=")
    if not d.pack and d.source == "synthetic" and d.max_doc_len > d.seq_len:
        raise ConfigError(f"data.pack=false: data.max_doc_len={d.max_doc_len} is the longest sequence and must "
                          f"be <= data.seq_len={d.seq_len}; raise seq_len or lower max_doc_len")
    if not d.pack and p.pp_schedule == "seq1f1b":
        raise ConfigError("parallel.pp_schedule=seq1f1b cuts packed sequences of data.seq_len tokens; "
                          "set data.pack=true")
    if p.sp_mode == "flexsp":
        if cfg.recipe != "sft":
            raise ConfigError(f"parallel.sp_mode=flexsp supports recipe=sft; got recipe={cfg.recipe}: FlexSP places "
                              f"each sequence in an SP group by its own length, but DPO's loss couples a pair's "
                              f"chosen and rejected sequences, which its planner does not keep together; use "
                              f"parallel.sp_mode=ring, ulysses or hybrid")
        if p.ring_window:
            raise ConfigError(f"parallel.ring_window={p.ring_window} is not supported with parallel.sp_mode=flexsp "
                              f"(its groups change size every step); use ring_window=0")
        if (dp * p.cp) & (dp * p.cp - 1):
            raise ConfigError(f"parallel.sp_mode=flexsp pools the dp*cp = {dp}*{p.cp} ranks into groups of sizes "
                              f"2^i; dp*cp must be a power of two (change parallel.dp or the world size)")
        f = cfg.flexsp
        if f.buckets < 1 or f.solve_time_s <= 0 or f.gpus_per_node < 1 or f.memory_gb < 0 or f.max_tokens_per_rank < 0:
            raise ConfigError(f"flexsp: buckets={f.buckets} and gpus_per_node={f.gpus_per_node} must be >= 1, "
                              f"solve_time_s={f.solve_time_s} > 0, memory_gb={f.memory_gb} and "
                              f"max_tokens_per_rank={f.max_tokens_per_rank} >= 0")
    elif d.pack and d.seq_len % unit:
        raise ConfigError(f"data.seq_len={d.seq_len} is not divisible by {why}{unit}; use "
                          f"data.seq_len={_list(_near_multiples(d.seq_len, unit))}")
    if min(d.min_doc_len, d.max_doc_len) < 2 or d.min_doc_len > d.max_doc_len:
        raise ConfigError(f"data.min_doc_len={d.min_doc_len} and data.max_doc_len={d.max_doc_len} "
                          f"must satisfy 2 <= min_doc_len <= max_doc_len")


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _near_multiples(n: int, unit: int) -> list[int]:
    below = n // unit * unit
    return [m for m in (below, below + unit) if m > 0]


def _list(values) -> str:
    *rest, last = map(str, values)
    return f"{', '.join(rest)} or {last}" if rest else last
