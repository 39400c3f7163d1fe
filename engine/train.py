"""The training loop: build the rank's model, optimizer and data, then step (DESIGN §1).

One optimizer step = forward/backward over this rank's micro-batches with every micro-batch's
token-loss sum divided by the global valid-token count of the step (I-5), then gradient
reduction, clipping by the mesh-wide norm, AdamW. The global batch is a function of the config
and the step alone, so every mesh trains on the same data.
"""
from __future__ import annotations

import random
import time

import torch

from engine import faults
from engine.checkpoint import export_hf, load_weights
from engine.metrics import RunLogger
from engine.resume import find_resume, load_training_checkpoint, prepare_checkpoint_dir, save_training_checkpoint
from engine.data.packing import PackedBatch, concat, valid_tokens
from engine.data.prefetch import StepPrefetcher
from engine.data.synthetic import SyntheticDocuments, SyntheticSequences
from engine.model.gpt import GPTModel, init_canonical
from engine.model.sharding import stage_layers
from engine.optim import MeshOptimizer
from engine.parallel.comm import all_reduce_
from engine.parallel.context import make_core_attention
from engine.parallel.context.layout import pad_documents, split_for_cp
from engine.parallel.pipeline.runtime import PipelineRuntime
from engine.parallel.pipeline.seqchunks import cp_gather_order, split_units, split_units_cp


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient (``train.max_bad_steps``)."""


def build_model(cfg, mesh, core_attention=None) -> torch.nn.ModuleList:
    """This rank's model chunks (one per virtual pipeline stage; one when vpp = 1), initialised
    identically for every mesh (or loaded from ``model.load``). ``core_attention``: the context
    attention (default: the mesh's cp mode; FlexSP passes its per-step one)."""
    core_attention = core_attention or make_core_attention(mesh, cfg.parallel.ring_window)
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    p = cfg.parallel
    ranges = stage_layers(cfg.model.num_layers, mesh.pp, p.vpp, p.layers_per_stage)[mesh.index("pp")]
    last = mesh.pp * p.vpp - 1
    chunks = torch.nn.ModuleList()
    with torch.device(mesh.device):
        for c, layers in enumerate(ranges):
            stage = c * mesh.pp + mesh.index("pp")
            chunks.append(GPTModel(cfg.model, mesh, dtype=dtype, core_attention=core_attention, layers=layers,
                                   pre_process=stage == 0, post_process=stage == last,
                                   recompute=cfg.train.recompute, tile_mlp=cfg.train.tile_mlp,
                                   loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                                   offload_activations=cfg.train.offload_activations,
                                   offload_keep_layers=cfg.train.offload_keep_layers))
    for chunk in chunks:
        if cfg.model.load:
            load_weights(chunk, cfg.model.load)
        else:
            chunk.load_canonical(init_canonical(chunk, cfg.train.seed))
    return chunks


def build_dataset(cfg):
    """The run's dataset: generated sequences, or ``data.path`` read as ``data.format`` says
    (engine/data/formats.py). Built before any process group (the CLI calls it first), so bad
    data is one error naming the file and the record, not a rank failing mid-rendezvous."""
    d = cfg.data
    if d.source == "synthetic" and not d.pack:
        return SyntheticDocuments(cfg.model.vocab_size, d.min_doc_len, d.max_doc_len, cfg.train.seed)
    if d.source == "synthetic":
        return SyntheticSequences(cfg.model.vocab_size, d.seq_len, d.min_doc_len, d.max_doc_len, cfg.train.seed)
    from engine.data.formats import build_file_dataset

    return build_file_dataset(cfg, lambda: load_tokenizer(cfg))


def load_tokenizer(cfg):
    """The run's tokenizer: ``data.tokenizer``, else a Hugging Face ``model.load`` itself, else the
    hf/ folder of the loaded checkpoint."""
    from engine.config.hf_model import tokenizer_dir
    from engine.data.formats import load_tokenizer_dir
    from engine.data.records import DataError

    path = tokenizer_dir(cfg)
    tok = load_tokenizer_dir(path)  # a damaged directory: one DataError naming it
    if len(tok) > cfg.model.vocab_size:
        raise DataError(f"the tokenizer at {path} has {len(tok)} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; use a matching model")
    return tok


def host_micro_batches(dataset, step: int, cfg, mesh) -> list:
    """This rank's share of the global batch of ``step``, built on the host (CPU tensors, their
    longest documents and loss-token counts as Python ints): the dp rank's sequences as
    micro-batches, each cut into this cp rank's zigzag slice (I-3) — or, under Seq1F1B, each a
    list of sequence units (cut first, then laid out over cp, with their prefix gather plans)."""
    gbs, mbs, p = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.parallel
    per_dp = gbs // mesh.dp
    first = step * gbs + mesh.index("dp") * per_dp
    seqs = [dataset.sequence(i) for i in range(first, first + per_dp)]
    full = [concat(seqs[i:i + mbs]) for i in range(0, per_dp, mbs)]
    where = dict(rp=mesh.rp, hp=mesh.hp, tp=mesh.tp, ring_rank=mesh.index("rp"), head_rank=mesh.index("hp"))
    if p.pp_schedule == "seq1f1b" and p.seq_chunks > 1:
        multiple = mesh.tp if mesh.cp == 1 else 2 * mesh.cp * mesh.tp
        order = cp_gather_order(mesh) if mesh.cp > 1 else None
        out = []
        for mb in full:
            lengths = unit_lengths(mb.num_tokens, p.seq_chunks, cfg.model, multiple, p.seq_partition)
            out.append(split_units(mb, lengths) if mesh.cp == 1 else
                       split_units_cp(mb, lengths, cp_group=mesh.group("cp"), cp_order=order, **where))
        return out
    if mesh.cp > 1:
        return [split_for_cp(mb, **where) for mb in full]
    if mesh.tp > 1:  # unpacked sequences: a padding document makes the tokens split over tp
        return [pad_documents(mb, 1, mesh.tp) if mb.num_tokens % mesh.tp else mb for mb in full]
    return full


def batches_to(batches: list, device) -> list:
    """Micro-batches (or Seq1F1B unit lists) on ``device``; host-to-device copies that do not
    block the host (pinned memory on a real GPU, :func:`engine.data.packing.to_device`)."""
    return [[u.to(device) for u in mb] if isinstance(mb, list) else mb.to(device) for mb in batches]


def rank_micro_batches(dataset, step: int, cfg, mesh) -> list:
    """:func:`host_micro_batches` on the mesh's device."""
    return batches_to(host_micro_batches(dataset, step, cfg, mesh), mesh.device)


def step_valid_tokens(dataset, step: int, cfg) -> int:
    """Loss tokens of the whole global batch of ``step`` (every dp×cp rank's together), counted on
    the host from the data alone: the denominator of I-5, with no collective and no device read."""
    gbs = cfg.train.global_batch_size
    return valid_tokens(dataset, range(step * gbs, (step + 1) * gbs))


def global_valid_tokens(micro_batches: list[PackedBatch], mesh) -> torch.Tensor:
    """Valid tokens of the whole step over every dp×cp rank (tp ranks share theirs), as a 0-dim
    fp64 device tensor: this rank's host counts summed over dp×cp on the device (no host read)."""
    n = torch.full((), float(sum(mb.num_valid for mb in micro_batches)), dtype=torch.float64, device=mesh.device)
    return all_reduce_(n, mesh.group("dp_cp"))


def forward_backward(model, micro_batches: list, mesh, parallel=None, num_valid: int | None = None,
                     grad_sync=None) -> tuple[torch.Tensor, int]:
    """Accumulate gradients of loss = Σ token losses / global valid tokens over this rank's
    micro-batches (or Seq1F1B unit lists) through the pipeline schedule; returns (loss of the
    step as a 0-dim fp64 device tensor, valid tokens as a host int).

    ``num_valid``: the step's global valid-token count when the host knows it
    (:func:`step_valid_tokens`; ``train`` passes it): then the step reads nothing back from the
    device (I-9). Left out, the count is summed over dp×cp on the device and read once (a sync).
    ``grad_sync``: the optimizer's ``grad_sync`` (``PipelineRuntime.grad_sync``: gradient
    reduction overlapped with backward), or None."""
    units = [mb if isinstance(mb, list) else [mb] for mb in micro_batches]
    if num_valid is None:
        divisor = global_valid_tokens([u for mb in units for u in mb], mesh)
        num_valid = int(divisor)
    else:
        divisor = torch.full((), float(num_valid), dtype=torch.float64, device=mesh.device)
    schedule = parallel.pp_schedule if parallel else "1f1b"
    runtime = PipelineRuntime(list(model), mesh, schedule, len(units[0]))
    runtime.grad_sync = grad_sync
    total = runtime.run(units, divisor)
    all_reduce_(total, mesh.group("pp"))  # the loss lives on the last stage
    return all_reduce_(total, mesh.group("dp_cp")), num_valid


def unit_lengths(num_tokens: int, k: int, model_cfg, multiple: int, partition: str) -> list[int]:
    """Seq1F1B unit lengths of a micro-batch: equal tokens or equal compute, in ``multiple``s."""
    from engine.parallel.pipeline.partition import compute_partition, uniform_partition

    if partition == "uniform":
        return uniform_partition(num_tokens, k, multiple)
    m = model_cfg
    return compute_partition(num_tokens, k, multiple, hidden=m.hidden_size, num_layers=m.num_layers,
                             num_heads=m.num_attention_heads, head_dim=m.head_dim, ffn=m.ffn_hidden_size,
                             vocab=m.vocab_size)


def host_step(dataset, step: int, cfg, mesh) -> tuple[list, int | None, int]:
    """Everything of ``step`` built on the host, ahead of time (engine/data/prefetch.py): this
    rank's micro-batches, the step's global loss-token count (None for DPO, which counts pairs)
    and its token count."""
    if cfg.recipe == "dpo":
        from engine.recipes.dpo import dpo_micro_batches

        return dpo_micro_batches(dataset, step, cfg, mesh, device="cpu"), None, step_tokens(dataset, step, cfg)
    return (host_micro_batches(dataset, step, cfg, mesh), step_valid_tokens(dataset, step, cfg),
            step_tokens(dataset, step, cfg))


def step_tokens(dataset, step: int, cfg) -> int:
    """Every token of the step's sequences (packed: gbs × seq_len; unpacked: their lengths)."""
    gbs = cfg.train.global_batch_size
    if cfg.data.pack:
        return gbs * cfg.data.seq_len
    from engine.flexsp.runtime import sequence_length

    return sum(sequence_length(dataset, i) for i in range(step * gbs, (step + 1) * gbs))


def finish(model, opt, mesh, cfg) -> None:
    """Final checkpoint and HF export, as configured."""
    ck = cfg.checkpoint
    if ck.save_final:
        where = save_training_checkpoint(model, opt, mesh, cfg, cfg.train.steps)
        if where:
            print(f"saved checkpoint {where}", flush=True)
    if ck.export_hf:
        from engine.config.hf_model import tokenizer_dir

        tokenizer = tokenizer_dir(cfg)
        # streamed tensor by tensor, each stage writing its own (FSDP2's shards gathered one at a time)
        export_hf(model, mesh, ck.export_hf, tokenizer_from=tokenizer,
                  dtype=torch.bfloat16 if cfg.train.bf16 else torch.float32)
        if mesh.rank == 0:
            print(f"exported Hugging Face model to {ck.export_hf}", flush=True)


def dpo_forward_backward(model, reference, micro_batches, mesh, cfg,
                         grad_sync=None) -> tuple[torch.Tensor, int, dict]:
    """DPO step: reference log-probs through the frozen model first (forward only), then the
    policy's forward/backward with the DPO loss on the last stage. Returns the loss and the
    reward metrics as 0-dim device tensors (read once, at logging: I-9) and the pair count.
    ``reference`` None: the micro-batches already carry their reference sums
    (``dpo.precompute_reference``, :mod:`engine.recipes.reference_cache`).
    ``grad_sync``: as in :func:`forward_backward`."""
    from engine.recipes.dpo import DPOLoss, compute_reference

    if reference is not None:
        compute_reference(PipelineRuntime(list(reference), mesh), micro_batches)
    loss_fn = DPOLoss(cfg, cfg.train.global_batch_size)
    runtime = PipelineRuntime(list(model), mesh, cfg.parallel.pp_schedule)
    runtime.grad_sync = grad_sync
    total = runtime.run([[mb] for mb in micro_batches], None, loss_fn)
    all_reduce_(total, mesh.group("pp"))
    all_reduce_(total, mesh.group("dp"))  # cp ranks hold the same (already cp-reduced) loss
    return total, cfg.train.global_batch_size, loss_fn.reduce_metrics(mesh)


def read_logged(values: dict) -> dict:
    """``values`` with every device tensor among them read back as a float, all in ONE
    device-to-host transfer (I-9: the loop's logging costs one sync, whatever it logs)."""
    keys = [k for k, v in values.items() if torch.is_tensor(v)]
    if not keys:
        return dict(values)
    host = torch.stack([values[k].detach().reshape(()).double() for k in keys]).tolist()
    return {**values, **dict(zip(keys, host))}


def train(cfg, mesh, dataset=None) -> list[dict]:
    """Run ``cfg.train.steps`` optimizer steps; returns the metrics rows (on every rank).
    ``dataset``: :func:`build_dataset`'s, when the caller built it (before the process group)."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)  # every RNG a checkpoint saves starts from the seed (runs compare bitwise)
    flex = None
    if cfg.parallel.sp_mode == "flexsp":
        from engine.flexsp.runtime import FlexSPRuntime

        flex = FlexSPRuntime(cfg, mesh)
    dataset = build_dataset(cfg) if dataset is None else dataset
    reference = reference_logps = None
    if cfg.recipe == "dpo" and cfg.dpo.precompute_reference:
        # before the policy exists, so the pass's reference model is the only model in memory;
        # training then reads cached sums and holds no reference
        from engine.recipes.reference_cache import precomputed_reference

        reference_logps = precomputed_reference(cfg, mesh, dataset,
                                                lambda: build_model(cfg, mesh).requires_grad_(False).eval())
    model = build_model(cfg, mesh, flex.attention if flex else None)
    if cfg.recipe == "dpo" and reference_logps is None:  # the frozen reference: the policy's starting weights
        reference = build_model(cfg, mesh).requires_grad_(False).eval()
    opt = MeshOptimizer(model, cfg.optim, mesh, cfg.train.steps)
    first_step = 0
    prepare_checkpoint_dir(cfg, mesh)  # what a killed save left behind, before anything reads or writes there
    where = find_resume(cfg)
    if where:
        first_step = load_training_checkpoint(model, opt, mesh, where)
        if mesh.rank == 0:
            print(f"resumed from {where} at step {first_step}", flush=True)
    from engine.config.loader import config_to_dict

    log = RunLogger(cfg.train.output_dir, enabled=mesh.rank == 0, total_steps=cfg.train.steps,
                    start_step=first_step, tensorboard=cfg.train.tensorboard,
                    wandb_project=cfg.train.wandb_project, wandb_mode=cfg.train.wandb_mode,
                    run_config=config_to_dict(cfg))
    rows, start, bad, skipped = [], time.perf_counter(), 0, 0
    ck = cfg.checkpoint
    prefetch = None if flex is not None else StepPrefetcher(lambda s: host_step(dataset, s, cfg, mesh),
                                                            first_step, cfg.train.steps)
    for step in range(first_step, cfg.train.steps):
        t0 = time.perf_counter()
        faults.at_step_start(step, mesh.rank)
        extra = {}
        # gradient buckets reduce during backward; a step whose gradients a test poisons on some
        # rank (MESHTRON_FAULT=nan@...) reduces them after it instead, on every rank (the same
        # collectives in the same order), so the NaN is in what is reduced
        poisoned = any(faults.active("nan", step, r) for r in range(mesh.layout.world_size))
        grad_sync = None if poisoned else opt.grad_sync
        host, num_valid, all_tokens = prefetch.get(step) if prefetch is not None else (None, None, None)
        if cfg.recipe == "dpo":
            micro_batches = [mb.to(mesh.device) for mb in host]
            if reference_logps is not None:  # the step's pairs' precomputed sums: no reference forward
                reference_logps.attach(micro_batches, step)
            loss, num_tokens, extra = dpo_forward_backward(model, reference, micro_batches, mesh, cfg,
                                                           grad_sync=grad_sync)
        elif flex is not None:
            plan = flex.plan(dataset, step, cfg.train.steps)
            loss, num_tokens = flex.forward_backward(model, dataset, step, plan)
            extra = {"flexsp_micro_batches": len(plan.micro_batches),
                     "flexsp_groups": [[g.size for g in mb] for mb in plan.micro_batches]}
        else:
            loss, num_tokens = forward_backward(model, batches_to(host, mesh.device), mesh, cfg.parallel,
                                                num_valid=num_valid, grad_sync=grad_sync)
        faults.poison_gradients(model.parameters(), step, mesh.rank)
        stats = opt.step(loss)  # a device loss: read with the grad norm for the NaN/Inf check
        if "loss" in stats:
            loss = stats.pop("loss")
        # whatever the loop logs that is still on the device (DPO's metrics): one transfer
        logged = read_logged({"loss": loss, **extra})
        loss = logged.pop("loss")
        bad = bad + 1 if stats["skipped"] else 0
        skipped += stats["skipped"]
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": loss, **stats, "skipped_steps": skipped, **logged, "num_tokens": num_tokens,
               "time_s": dt,
               # throughput counts every token of the step's sequences (loss tokens are num_tokens)
               "tokens_per_s": (all_tokens if all_tokens is not None else step_tokens(dataset, step, cfg)) / dt}
        rows.append(row)
        log.log(row, echo=step % cfg.train.log_interval == 0 or step == cfg.train.steps - 1 or bool(bad))
        if bad and mesh.rank == 0:
            print(f"step {step}: loss {loss} / grad norm {stats['grad_norm']} is not finite: step skipped "
                  f"(no update; {bad} in a row, {skipped} in this run)", flush=True)
        if cfg.train.max_bad_steps and bad >= cfg.train.max_bad_steps:
            log.close()
            if prefetch is not None:
                prefetch.close()
            raise NonFiniteTraining(f"stopping at step {step}: the last {bad} steps (train.max_bad_steps="
                                    f"{cfg.train.max_bad_steps}) had a NaN/Inf loss or gradient and were skipped; "
                                    f"the weights are those after step {step - bad} — lower optim.lr, check the "
                                    f"data of these steps, or resume from a checkpoint")
        if ck.every and (step + 1) % ck.every == 0 and step + 1 < cfg.train.steps:
            save_training_checkpoint(model, opt, mesh, cfg, step + 1)
    log.close()
    if flex is not None:
        flex.close()
    if prefetch is not None:
        prefetch.close()
    finish(model, opt, mesh, cfg)
    if mesh.rank == 0 and rows:
        elapsed = time.perf_counter() - start
        print(f"done: {len(rows)} steps in {elapsed:.1f}s | first loss {rows[0]['loss']:.4f} | "
              f"last loss {rows[-1]['loss']:.4f} | mesh {mesh}", flush=True)
    return rows
