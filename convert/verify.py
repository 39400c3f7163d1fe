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


def _meshtron_rank(rank, world, megatron_dir, tp, cp, seq, out_dir):
    from convert.megatron_io import load_megatron
    from engine.checkpoint import repad_vocab
    from engine.config.schema import ModelConfig
    from engine.data.packing import concat, document_arrays, pack
    from engine.mesh import ParallelMesh
    from engine.model.gpt import GPTModel
    from engine.parallel.comm import gather_shards
    from engine.parallel.context import make_core_attention
    from engine.parallel.context.layout import split_for_cp

    canon, model_dict, _ = load_megatron(megatron_dir)
    cfg = ModelConfig(**model_dict)
    mesh = ParallelMesh.build(tp=tp, cp=cp, dp=world // (tp * cp)) if world > 1 else ParallelMesh.single()
    model = GPTModel(cfg, mesh, core_attention=make_core_attention(mesh)).eval()
    model.load_canonical(repad_vocab(canon, cfg.vocab_size, model.padded_vocab))
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
    with torch.no_grad():
        logits = torch.cat(gather_shards(model(batch).float(), mesh.group("tp")), dim=-1)[:, :cfg.vocab_size]
    if mesh.index("tp") == 0:
        torch.save({"index": index, "logits": logits}, os.path.join(out_dir, f"rank{rank}.pt"))


def meshtron_logits(megatron_dir: str, tp: int, cp: int, seq: int, vocab: int) -> torch.Tensor:
    """meshtron's full logits ``[NUM_SEQUENCES, seq, vocab]`` at the (tp, cp) mesh."""
    from engine.spawn import run_world

    world = tp * cp
    with tempfile.TemporaryDirectory() as out:
        if world == 1:
            _meshtron_rank(0, 1, megatron_dir, tp, cp, seq, out)
        else:
            run_world(world, _meshtron_rank, megatron_dir, tp, cp, seq, out, timeout=1800)
        full = torch.full((NUM_SEQUENCES * seq, vocab), float("nan"))
        for f in os.listdir(out):
            part = torch.load(os.path.join(out, f))
            real = part["index"] >= 0
            full[part["index"][real]] = part["logits"][real]
    return full.view(NUM_SEQUENCES, seq, vocab)


def main(args) -> int:
    from transformers import AutoModelForCausalLM

    if args.pp > 1:
        raise ValueError("verify --pp > 1 needs pipeline parallelism, which is not implemented yet; use --pp 1")
    hf = AutoModelForCausalLM.from_pretrained(args.hf, local_files_only=True, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    vocab = hf.config.vocab_size
    ids = _token_ids(vocab, args.seq)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    ours = meshtron_logits(args.megatron, args.tp, args.cp, args.seq, vocab)
    diff = float((ours - ref).abs().max())
    print(f"max |logits(meshtron, tp={args.tp}, cp={args.cp}) - logits(transformers)| = {diff:.3e} "
          f"(tolerance {args.tolerance:.1e}, {NUM_SEQUENCES}x{args.seq} tokens, vocab {vocab})")
    if args.save_logits:
        torch.save(ours, args.save_logits)
        print(f"saved meshtron logits {tuple(ours.shape)} to {args.save_logits}")
    return 0 if diff <= args.tolerance else 1
