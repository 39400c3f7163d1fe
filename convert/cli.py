"""``meshtron-convert``: HF ↔ Megatron checkpoints, resharding, and a logits check.

  meshtron-convert hf-to-megatron --hf DIR --out DIR [--format torch_dist|torch] [--tp N --pp M --vpp V]
                                  [--layers-per-stage 3,1] [--dtype bf16|fp16|fp32]
  meshtron-convert megatron-to-hf --megatron DIR --out DIR [--dtype ...]
  meshtron-convert reshard --in DIR --out DIR --tp N --pp M [--vpp V] [--layers-per-stage ...]   (legacy torch format)
  meshtron-convert verify --hf DIR --megatron DIR [--tp N --cp N] [--save-logits FILE]

Everything goes through the canonical (unsharded, Megatron-named) state dict (DESIGN §5). Beside
the Megatron files a ``hf/`` folder keeps the source's config.json, generation config and
tokenizer files, so megatron-to-hf writes back exactly what came in.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from convert.megatron_io import open_megatron, resolve

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_META = "hf"
LPS_HELP = ("decoder layers of each pipeline stage, pp*vpp numbers in model order adding up to num_layers, "
            "e.g. 3,1 for an uneven pp=2 split (default: even, or Megatron's first/last-stage split)")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total if total > 0 else None, desc=desc, unit="tensor", file=sys.stderr)


def hf_to_megatron(args) -> None:
    from convert.hf_io import HFCheckpoint, TOKENIZER_FILES
    from convert.hf_map import iter_hf_to_canonical, model_config_from_hf
    from convert.stream import StreamGetter
    from engine.config.schema import ModelConfig
    from engine.model.gpt import padded_vocab_size
    from engine.model.sharding import canonical_names

    src = HFCheckpoint(args.hf)
    model = {**_model_defaults(), **model_config_from_hf(src.config)}
    _check_tp(model, args.tp)
    if args.layers_per_stage is not None and args.format != "torch":
        raise ValueError("--layers-per-stage needs --format torch: a torch_dist checkpoint has no pipeline "
                         "layout (it loads at any pp; set parallel.layers_per_stage when training instead)")
    if args.format == "torch":
        _check_layers_per_stage(args.layers_per_stage, model, args.pp, args.vpp)
    padded = padded_vocab_size(model["vocab_size"], model["make_vocab_size_divisible_by"], args.tp)
    names = canonical_names(model)
    retain = ("embedding.word_embeddings.weight",) if model["tie_word_embeddings"] else ()
    get = StreamGetter(iter_hf_to_canonical(src.get, model, padded), names, retain,
                       cast=DTYPES[args.dtype] if args.dtype else None)
    ModelConfig(**model)  # every key is a known field
    with _progress(len(names), "hf-to-megatron") as bar:
        if args.format == "torch_dist":
            from convert.megatron_dist import save_dist
            save_dist(get, names, model, args.out, iteration=0, progress=bar.update, padded_vocab=padded,
                      dtype=DTYPES[args.dtype] if args.dtype else None)
        else:
            from convert.megatron_legacy import save_legacy
            save_legacy(get, names, model, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp,
                        layers_per_stage=args.layers_per_stage, iteration=0, progress=bar.update)
    meta = os.path.join(args.out, HF_META)
    os.makedirs(meta, exist_ok=True)
    for fname in ("config.json", "generation_config.json") + TOKENIZER_FILES:
        if os.path.isfile(os.path.join(args.hf, fname)):
            shutil.copy2(os.path.join(args.hf, fname), os.path.join(meta, fname))
    print(f"wrote {args.format} checkpoint of {len(names)} tensors to {args.out}")


def megatron_to_hf(args) -> None:
    from convert.hf_io import write_hf
    from convert.hf_map import hf_tensor_specs, iter_canonical_to_hf
    from convert.layout import dist_key

    src = open_megatron(args.megatron)  # one canonical tensor at a time, never the whole model
    model = src.model
    meta = os.path.join(args.megatron, HF_META)
    config = _hf_config(meta, model)
    cast = DTYPES[args.dtype] if args.dtype else None
    specs = hf_tensor_specs(model, cast or (lambda name: src.dtype(dist_key(name)[0])))
    tensors = ((n, t if cast is None else t.to(cast)) for n, t in iter_canonical_to_hf(src.get, model))
    with _progress(len(specs), "megatron-to-hf") as bar:
        write_hf(tensors, config, args.out, specs=specs, tokenizer_from=meta if os.path.isdir(meta) else None,
                 progress=bar.update)
    print(f"wrote Hugging Face model to {args.out}")


def _hf_config(meta_dir: str, model: dict):
    """The source's HF config when the checkpoint carries it (keeps token ids and every field
    meshtron does not model), else one built from the model config."""
    from transformers import AutoConfig

    from convert.hf_map import hf_config_from_model_config, model_config_from_hf

    if os.path.isfile(os.path.join(meta_dir, "config.json")):
        config = AutoConfig.from_pretrained(meta_dir, local_files_only=True)
        ours = model_config_from_hf(config)
        changed = {k: (v, model[k]) for k, v in ours.items() if model.get(k) != v}
        if not changed:
            return config
    return hf_config_from_model_config(model)


def reshard(args) -> None:
    from convert.hf_map import pad_vocab, unpad_vocab
    from convert.layout import VOCAB_KEYS
    from convert.legacy_source import LegacySource
    from convert.megatron_legacy import save_legacy
    from engine.model.gpt import padded_vocab_size
    from engine.model.sharding import canonical_names

    if resolve(args.inp)[0] != "torch":
        raise ValueError(f"{args.inp} is a torch_dist checkpoint: it loads at any tp/pp, no resharding needed")
    src = LegacySource(args.inp)  # files mapped; one canonical tensor assembled at a time
    model, meta = src.model, src.meta
    _check_tp(model, args.tp)
    _check_layers_per_stage(args.layers_per_stage, model, args.pp, args.vpp)
    padded = padded_vocab_size(model["vocab_size"], model["make_vocab_size_divisible_by"], args.tp)

    def get(name: str) -> torch.Tensor:  # vocabulary rows re-padded for the new tp
        t = src.get(name)
        return pad_vocab(unpad_vocab(t, model["vocab_size"]), padded) if name in VOCAB_KEYS else t

    save_legacy(get, canonical_names(model), model, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp,
                layers_per_stage=args.layers_per_stage, iteration=meta.get("iteration") or 0,
                extra=meta.get("extra"))
    if os.path.isdir(os.path.join(args.inp, HF_META)):
        shutil.copytree(os.path.join(args.inp, HF_META), os.path.join(args.out, HF_META))
    print(f"resharded {args.inp} (tp={meta['tp']}, pp={meta['pp']}) to {args.out} (tp={args.tp}, pp={args.pp})")


def _check_tp(model: dict, tp: int) -> None:
    for key in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if model[key] % tp:
            raise ValueError(f"--tp {tp} does not divide {key}={model[key]} of the model; use a tp that "
                             f"divides num_attention_heads, num_query_groups and ffn_hidden_size")


def _layers_list(text: str) -> list[int]:
    """``--layers-per-stage 3,1`` -> [3, 1] (the checks against the model are in
    :func:`_check_layers_per_stage`)."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer counts, e.g. 3,1") from None


def _check_layers_per_stage(lps: list[int] | None, model: dict, pp: int, vpp: int) -> None:
    """The explicit split (model order: virtual stage v = chunk·pp + pp rank) fits the model and
    the pipeline; None keeps the default split (engine.model.sharding.stage_layers) where one exists."""
    from engine.model.sharding import stage_layers

    if lps is None:
        try:
            stage_layers(model["num_layers"], pp, vpp)
        except ValueError as e:  # name the option that gives them
            raise ValueError(f"{e} with --layers-per-stage N,N,... ({pp * vpp} numbers)") from None
        return
    stages, num_layers = pp * vpp, model["num_layers"]
    if len(lps) != stages or min(lps) < 1 or sum(lps) != num_layers:
        raise ValueError(f"--layers-per-stage {','.join(map(str, lps))} must list pp*vpp = {pp}*{vpp} = {stages} "
                         f"positive layer counts adding up to num_layers={num_layers} (got {len(lps)} "
                         f"adding up to {sum(lps)})")


def _model_defaults() -> dict:
    import dataclasses

    from engine.config.schema import ModelConfig

    return {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k != "load"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="meshtron-convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-megatron", help="HF model directory -> Megatron checkpoint")
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("torch_dist", "torch"), default="torch_dist")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=1)
    p.add_argument("--layers-per-stage", type=_layers_list, default=None, metavar="N,N,...",
                   help=LPS_HELP + " (--format torch only)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    p.set_defaults(fn=hf_to_megatron)
    p = sub.add_parser("megatron-to-hf", help="Megatron checkpoint (either format) -> HF model directory")
    p.add_argument("--megatron", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.set_defaults(fn=megatron_to_hf)
    p = sub.add_parser("reshard", help="legacy Megatron checkpoint -> another tp/pp")
    p.add_argument("--in", dest="inp", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--vpp", type=int, default=1)
    p.add_argument("--layers-per-stage", type=_layers_list, default=None, metavar="N,N,...", help=LPS_HELP)
    p.set_defaults(fn=reshard)
    p = sub.add_parser("verify", help="compare meshtron's logits with transformers'")
    p.add_argument("--hf", required=True)
    p.add_argument("--megatron", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--seq", type=int, default=64, help="tokens per test sequence")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed")
    p.add_argument("--save-logits", default=None, help="write meshtron's logits [batch, seq, vocab] here")
    p.set_defaults(fn=lambda a: sys.exit(__import__("convert.verify", fromlist=["main"]).main(a)))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("tp", "pp", "vpp", "cp"):
        if getattr(args, flag, 1) < 1:
            print(f"meshtron-convert: error: --{flag} must be >= 1", file=sys.stderr)
            return 2
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"meshtron-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
