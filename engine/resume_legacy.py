"""Training checkpoints in Megatron-LM's legacy ``torch`` format (``checkpoint.format: torch``).

Each (tp, pp) rank of dp×cp replica 0 writes its own ``mp_rank_TT[_PPP]/model_optim_rng.pt`` as
convert/megatron_legacy.py ``save_legacy`` lays it out (megatron-core's GPTModel loads it with
``strict=True``): ``model`` (``model0``, ``model1``… with virtual pipeline stages) = the chunk's
parameters under megatron-core's local-spec names with local layer numbers, plus the ``None``
``_extra_state`` entries of every linear; ``args``; ``checkpoint_version``; ``iteration``. The
tensors are the parameters themselves (under ZeRO-1 views of its flat buffers, as Megatron's own
distributed optimizer saves them): nothing is copied.

What a resume needs besides the weights is meshtron's: every rank holding distinct optimizer
state (all ranks under ZeRO-1, replica 0 of the replicated state) writes
``meshtron_optim/rank_RRRRR.pt`` = ``{"chunks": [(key, offsets, sizes, tensor)], "shapes": {key:
global shape}}`` — the same global rectangles and keys (``optimizer.state.exp_avg.<key>``, …) as
a torch_dist checkpoint — so convert/legacy_source.py resumes it at this mesh exactly, or at any
other. FSDP2 is refused by the config check: its weights would have to be gathered per (tp, pp)
file, beyond a rank's own shards (I-8).
"""
from __future__ import annotations

import os

import torch

from convert.files import save_durable
from convert.legacy_source import optim_file
from convert.megatron_dist import optimizer_key
from convert.megatron_legacy import _LINEARS as LINEARS
from convert.megatron_legacy import CHECKPOINT_VERSION, FILE_NAME, megatron_args, rank_dir
from engine.checkpoint import model_chunks, model_dict, owned_pieces, replica_index
from engine.model.sharding import stage_layers


def save_legacy_files(model, opt, mesh, cfg, tmp: str, step: int, dtype: torch.dtype) -> None:
    """This rank's files of a legacy-format training checkpoint in ``tmp`` (see the module docstring)."""
    chunks = model_chunks(model)
    if replica_index(mesh) == 0:
        p = cfg.parallel
        stages = stage_layers(cfg.model.num_layers, mesh.pp, p.vpp, p.layers_per_stage)
        lps = [len(stages[v % mesh.pp][v // mesh.pp]) for v in range(mesh.pp * p.vpp)]
        state = {}
        for c, chunk in enumerate(chunks):
            sd = {name: t.detach() for name, t in chunk.named_parameters()}
            keys = [f"decoder.layers.{i}.{lin}._extra_state"
                    for i in range(len(chunk.decoder.layers)) for lin in LINEARS]
            sd.update(dict.fromkeys(keys + (["output_layer._extra_state"] if chunk.post_process else [])))
            state["model" if len(chunks) == 1 else f"model{c}"] = sd
        args = megatron_args(model_dict(chunks[0].cfg), mesh.tp, mesh.pp, p.vpp, lps, chunks[0].padded_vocab,
                             dtype, step)
        state.update(args=args, checkpoint_version=CHECKPOINT_VERSION, iteration=step)
        path = os.path.join(tmp, rank_dir(mesh.index("tp"), mesh.index("pp"), mesh.pp), FILE_NAME)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_durable(state, path)
    if opt.state.sharded or replica_index(mesh) == 0:
        found, shapes = [], {}
        # a replicated state is written whole by replica 0: views of whole tensors, nothing copied
        for where, lo, hi, roles in owned_pieces(model, opt, mesh, split=False):
            for role, flat in roles.items():
                if role == "param" or (role == "fp32_param" and not opt.mixed):
                    continue
                for c in where.chunks(lo, hi):
                    key = optimizer_key(role, c.key)
                    found.append((key, c.offsets, c.sizes, flat[c.lo - lo:c.hi - lo].view(c.sizes)))
                    shapes[key] = where.global_shape
        os.makedirs(os.path.dirname(optim_file(tmp, mesh.rank)), exist_ok=True)
        save_durable({"chunks": found, "shapes": shapes}, optim_file(tmp, mesh.rank))
