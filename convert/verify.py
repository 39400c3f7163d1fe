"""``meshtron-convert verify``: transformers and meshtron on the same token ids.

meshtron runs the Megatron checkpoint at the requested mesh (a gloo world of tp·cp CPU
processes); its full logits are reassembled (vocabulary gathered over tp, tokens over cp) and
compared with transformers' logits of the HF model. Exit status 1 past the tolerance.
"""
from __future__ import annotations

import os
import tempfile

import torch

NUM_SEQUENCES = 2


def _token_ids(vocab: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (NUM_SEQUENCES, seq), generator=torch.Generator().manual_seed(0))


def _meshtron_rank(rank, world, megatron_dir, tp, pp, cp, seq, out_dir):
    from engine.config import load_config, validate
    from engine.data.packing import concat, document_arrays, pack
    from engine.mesh import ParallelMesh
    from engine.parallel.comm import gather_shards
    from engine.parallel.context.layout import split_for_cp
    from engine.parallel.pipeline.runtime import PipelineRuntime
    from engine.train import build_model

    from convert.megatron_io import open_megatron

    model_dict = open_megatron(megatron_dir).model  # the config only: no tensor is read here
    overrides = [f"model.{k}={v!r}" if isinstance(v, str) else f"model.{k}={_yaml(v)}" for k, v in model_dict.items()]
    cfg = validate(load_config(None, overrides + [f"model.load={megatron_dir}", f"parallel.tp={tp}",
                                                  f"parallel.pp={pp}", f"parallel.cp={cp}"]), world)
    mesh = ParallelMesh.build(tp=tp, cp=cp, pp=pp, dp=1) if world > 1 else ParallelMesh.single()
    chunks = build_model(cfg, mesh).eval()
    cfg = cfg.model
    ids = _token_ids(cfg.vocab_size, seq)
    batch = concat([pack([document_arrays(row.tolist())[:2]]) for row in ids])
    index = batch.tokens.clone()
    if cp > 1:
        index_batch = type(batch)(torch.arange(batch.num_tokens) + 1, batch.labels, batch.position_ids,
                                  batch.cu_seqlens)
        where = dict(rp=mesh.rp, hp=mesh.hp, tp=tp, ring_rank=mesh.index("rp"), head_rank=mesh.index("hp"))
        index = split_for_cp(index_batch, **where).tokens - 1
        batch = split_for_cp(batch, **where)
    else:
        index = torch.arange(batch.num_tokens)
    out = PipelineRuntime(list(chunks), mesh).forward_only(batch)
    if out is not None and mesh.index("tp") == 0:
        logits = torch.cat(gather_shards(out.float(), mesh.group("tp")), dim=-1)[:, :cfg.vocab_size]
        torch.save({"index": index, "logits": logits}, os.path.join(out_dir, f"rank{rank}.pt"))
    elif out is not None:
        gather_shards(out.float(), mesh.group("tp"))


def _yaml(v) -> str:
    import json
    return json.dumps(v)


def meshtron_logits(megatron_dir: str, tp: int, pp: int, cp: int, seq: int, vocab: int) -> torch.Tensor:
    """meshtron's full logits ``[NUM_SEQUENCES, seq, vocab]`` at the (tp, pp, cp) mesh."""
    from engine.spawn import run_world

    world = tp * pp * cp
    with tempfile.TemporaryDirectory() as out:
        if world == 1:
            _meshtron_rank(0, 1, megatron_dir, tp, pp, cp, seq, out)
        else:
            run_world(world, _meshtron_rank, megatron_dir, tp, pp, cp, seq, out, timeout=1800)
        full = torch.full((NUM_SEQUENCES * seq, vocab), float("nan"))
        for f in os.listdir(out):
            part = torch.load(os.path.join(out, f), weights_only=True)
            real = part["index"] >= 0
            full[part["index"][real]] = part["logits"][real]
    return full.view(NUM_SEQUENCES, seq, vocab)


def main(args) -> int:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.hf, local_files_only=True, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    vocab = hf.config.vocab_size
    ids = _token_ids(vocab, args.seq)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    ours = meshtron_logits(args.megatron, args.tp, args.pp, args.cp, args.seq, vocab)
    diff = float((ours - ref).abs().max())
    print(f"max |logits(meshtron, tp={args.tp}, pp={args.pp}, cp={args.cp}) - logits(transformers)| = {diff:.3e} "
          f"(tolerance {args.tolerance:.1e}, {NUM_SEQUENCES}x{args.seq} tokens, vocab {vocab})")
    if args.save_logits:
        torch.save(ours, args.save_logits)
        print(f"saved meshtron logits {tuple(ours.shape)} to {args.save_logits}")
    return 0 if diff <= args.tolerance else 1
