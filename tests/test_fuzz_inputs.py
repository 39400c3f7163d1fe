"""Fuzzing of every input meshtron reads (issue 17, point 4), with hypothesis: each damaged or odd
input either loads correctly or gives one error naming the file — never a hang, an interpreter
crash, another exception type, or a silently wrong tensor.

- data records of every ``data.format`` (messages, sharegpt, alpaca, preference, tokenized, text)
  as JSONL, JSON and parquet files of random bytes, random unicode and random JSON values of
  random shapes and nesting → a dataset whose sequences build, or ``DataError`` naming the file;
- Megatron ``.bin``/``.idx`` pairs with random damage → ``DataError``/``IndexedDataError`` naming
  the file, or a dataset that builds;
- tokenizer directories (the shipped tokenizer's files truncated, garbled or missing) → a
  tokenizer, or one error naming the directory;
- torch_dist checkpoint directories with random damage (truncated files, flipped bytes, deleted
  metadata, a shard of another dtype or shape): with the manifest (engine/manifest.py) every
  change of bytes is caught naming the file, and whatever passes loads the right tensors; without
  it, structural damage is one error naming the checkpoint.

``derandomize=True``: the same examples on every run (reproducible CI); ``deadline=None``: a
load's time varies with the machine. The whole file runs in about a minute on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "data" / "tiny"
TOKENIZER = TINY / "tokenizer"


def fuzz(n: int):
    """``n`` examples (times ``MESHTRON_FUZZ_SCALE`` for a deeper run by hand); no shrinking: a
    failure prints its example as drawn, and the file's time stays bounded."""
    n *= int(os.environ.get("MESHTRON_FUZZ_SCALE", "1"))
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def names_file(err: BaseException, *paths) -> bool:
    return any(str(p) in str(err) for p in paths)


# ---------------------------------------------------------------------------------------------
# Data records

_json_leaf = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
_json = st.recursive(_json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                            max_size=4), max_leaves=12)
_KEYS = ["messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output",
         "system", "history", "prompt", "chosen", "rejected", "input_ids", "labels", "loss_mask", "text"]
_role = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", "bogus", ""])
_turn = st.fixed_dictionaries({}, optional={"role": _role | _json, "content": st.text(max_size=20) | _json,
                                            "from": _role, "value": st.text(max_size=20)})
_ids = st.lists(st.integers(-3, 600), max_size=40)
# records shaped like each format, with random holes and wrong types: they get past the first checks
_record = st.fixed_dictionaries({}, optional={
    "messages": st.lists(_turn, max_size=4) | _json, "conversations": st.lists(_turn, max_size=4) | _json,
    "instruction": st.text(max_size=20) | _json, "input": st.text(max_size=20), "output": st.text(max_size=20) | _json,
    "prompt": st.text(max_size=20) | st.lists(_turn, max_size=3) | _json,
    "chosen": st.text(max_size=20) | st.lists(_turn, max_size=2) | _json,
    "rejected": st.text(max_size=20) | st.lists(_turn, max_size=2) | _json,
    "input_ids": _ids | _json, "labels": _ids | _json, "loss_mask": st.lists(st.integers(0, 1), max_size=40) | _json,
    "text": st.text(max_size=60) | _json, "system": st.text(max_size=10)})
_text = st.text(max_size=40)
_good_ids = st.lists(st.integers(0, 511), min_size=2, max_size=40)
# well-formed records of each format (unicode of every plane in their strings): a file mixing
# them with broken ones reaches tokenization, templates and packing, with skip_bad_records or not
_GOOD = {
    "messages": st.builds(lambda u, a: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
                          _text, _text),
    "sharegpt": st.builds(lambda u, a: {"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]},
                          _text, _text),
    "alpaca": st.builds(lambda i, x, o: {"instruction": i, "input": x, "output": o}, _text, _text, _text),
    "preference": st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, _text, _text, _text),
    "tokenized": _good_ids.flatmap(lambda ids: st.sampled_from([
        {"input_ids": ids}, {"input_ids": ids, "loss_mask": [1] * len(ids)},
        {"input_ids": ids, "labels": [-100] + ids[1:]}])),
    "text": st.builds(lambda t: {"text": t}, _text),
}
_good = st.one_of(*_GOOD.values())
_records = st.lists(_good | _good | _good | _record | st.dictionaries(st.sampled_from(_KEYS), _json, max_size=4) | _json,
                    min_size=0, max_size=6)

# (format, recipe)
FORMATS = [("messages", "sft"), ("sharegpt", "sft"), ("alpaca", "sft"), ("auto", "sft"), ("preference", "dpo"),
           ("tokenized", "pretrain"), ("tokenized", "sft"), ("text", "pretrain")]


def _content(kind: str, value, ext: str) -> bytes | None:
    if kind == "bytes":
        return value
    if kind == "unicode":
        return value.encode("utf-8")
    if ext == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in value).encode("utf-8")
    if ext == ".json":
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    return None  # parquet: written from the records by pyarrow


def _write(path: Path, kind: str, value) -> bool:
    data = _content(kind, value, path.suffix)
    if data is not None:
        path.write_bytes(data)
        return True
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [r for r in value if isinstance(r, dict)]
    try:
        pq.write_table(pa.Table.from_pylist(rows), path)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return False  # records pyarrow cannot put in one table: not a parquet file anyone could write
    return True


def _data_cfg(path: Path, fmt: str, recipe: str, cache_dir: Path, *more):
    from engine.config import load_config, validate

    over = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", f"recipe={recipe}",
            "data.source=files", f"data.path={path}", f"data.format={fmt}", f"data.tokenizer={TOKENIZER}",
            f"data.seq_len={64 if recipe != 'dpo' else 128}", "data.cache=false", f"data.cache_dir={cache_dir}",
            "train.global_batch_size=2", *more]
    return validate(load_config(None, over), 1)


def _build_and_read(cfg) -> None:
    from engine.train import build_dataset

    ds = build_dataset(cfg)
    for i in range(3):
        ds.sequence(i)


@pytest.mark.parametrize("fmt,recipe", FORMATS)
@fuzz(120)
@given(ext=st.sampled_from([".jsonl", ".json", ".parquet"]),
       content=st.one_of(st.tuples(st.just("bytes"), st.binary(max_size=200)),
                         st.tuples(st.just("unicode"), st.text(max_size=200)),
                         st.tuples(st.just("records"), _records)),
       skip=st.booleans())
def test_data_records_load_or_name_the_file(fmt, recipe, ext, content, skip):
    from engine.data.records import DataError

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{ext}"
        if not _write(path, *content):
            return
        cfg = _data_cfg(path, fmt, recipe, Path(tmp) / "cache", f"data.skip_bad_records={skip}")
        try:
            _build_and_read(cfg)
            event("built")
        except DataError as e:
            event("DataError")
            assert names_file(e, path), f"{type(e).__name__} does not name {path}: {e}"


@fuzz(100)
@given(which=st.sampled_from([".idx", ".bin"]), how=st.sampled_from(["truncate", "flip", "append", "empty"]),
       at=st.floats(0, 1), mask=st.integers(1, 255))
def test_indexed_pairs_load_or_name_the_file(which, how, at, mask):
    from engine.data.indexed import IndexedDataError
    from engine.data.records import DataError

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "corpus"
        for ext in (".bin", ".idx"):
            shutil.copyfile(TINY / f"corpus_text_document{ext}", f"{prefix}{ext}")
        damaged = Path(f"{prefix}{which}")
        _damage_bytes(damaged, how, at, mask)
        cfg = _data_cfg(prefix, "megatron", "pretrain", Path(tmp) / "cache")
        try:
            _build_and_read(cfg)
            event(f"built ({which} {how})")
        except (DataError, IndexedDataError) as e:
            event(f"error ({which} {how})")
            assert names_file(e, f"{prefix}.bin", f"{prefix}.idx"), str(e)


def _damage_bytes(path: Path, how: str, at: float, mask: int) -> bool:
    """Damage ``path`` in place; False when that left its bytes unchanged."""
    data = path.read_bytes()
    if how == "truncate":
        new = data[:int(at * len(data))] if data else data
    elif how == "flip":
        if not data:
            return False
        k = min(int(at * len(data)), len(data) - 1)
        new = data[:k] + bytes([data[k] ^ mask]) + data[k + 1:]
    elif how == "append":
        new = data + bytes([mask]) * (1 + int(at * 16))
    elif how == "empty":
        new = b""
    else:  # "delete"
        path.unlink()
        return True
    path.write_bytes(new)
    return new != data


# ---------------------------------------------------------------------------------------------
# Tokenizer directories


@fuzz(50)
@given(name=st.sampled_from(["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]),
       how=st.sampled_from(["truncate", "flip", "append", "empty", "delete"]), at=st.floats(0, 1),
       mask=st.integers(1, 255))
def test_tokenizer_dir_loads_or_names_the_directory(name, how, at, mask):
    from engine.data.formats import load_tokenizer_dir
    from engine.data.records import DataError

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "tok"
        shutil.copytree(TOKENIZER, where)
        _damage_bytes(where / name, how, at, mask)
        try:
            tok = load_tokenizer_dir(str(where))
        except DataError as e:
            event(f"error ({name})")
            assert names_file(e, where), str(e)
            return
        event(f"loaded ({name} {how})")
        tok("hello world")["input_ids"]


# ---------------------------------------------------------------------------------------------
# Checkpoint directories


def _ckpt_cfg(out: Path, *over):
    from engine.config import load_config, validate

    return validate(load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.num_layers=2", f"train.output_dir={out}",
                                                                      *over]), 1)


def _save(out: Path, *over) -> tuple[Path, dict]:
    """A tiny torch_dist training checkpoint of weights that are not the init's, with its manifest;
    returns it and the weights saved."""
    from engine.manifest import write_manifest
    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.resume import save_training_checkpoint
    from engine.train import build_model

    cfg = _ckpt_cfg(out, *over)
    mesh = ParallelMesh.single()
    model = build_model(cfg, mesh)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
    opt = MeshOptimizer(model, cfg.optim, mesh, 10)
    opt.restore_step(3, True)
    where = Path(save_training_checkpoint(model, opt, mesh, cfg, 3))
    write_manifest(str(where))
    return where, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The checkpoint under test, plus one of bf16 weights and one of another shape whose files
    replace its own (a shard of another dtype or shape)."""
    base = tmp_path_factory.mktemp("ckpt")
    good, weights = _save(base / "good")
    bf16, _ = _save(base / "bf16", "train.bf16=true")
    wide, _ = _save(base / "wide", "model.hidden_size=128", "model.ffn_hidden_size=256")
    return _Checkpoints((good, weights, {"bf16": bf16, "wide": wide}))


class _Checkpoints(tuple):
    def __repr__(self):  # what hypothesis prints of a failing example: not every tensor
        return f"checkpoints({self[0]})"


def _load(where: Path) -> dict:
    """A full resume through the engine's own path, into a model freshly initialised."""
    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.resume import find_resume, load_training_checkpoint
    from engine.train import build_model

    cfg = _ckpt_cfg(where.parent / "resumed", f"train.resume={where}")
    mesh = ParallelMesh.single()
    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, 10)
    step = load_training_checkpoint(model, opt, mesh, find_resume(cfg))
    assert step == 3
    return model.state_dict()


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{k} loaded silently wrong"


def test_manifest_lists_every_file_and_verifies(checkpoints, tmp_path):
    from engine.manifest import (
        MANIFEST,
        file_entries,
        list_files,
        merge_entries,
        read_manifest,
        verify_manifest,
        write_manifest,
    )

    good, weights, _ = checkpoints
    files = read_manifest(str(good))
    assert sorted(files) == list_files(str(good)) and MANIFEST not in files
    assert {".metadata", "__0_0.distcp", "meshtron_train.pt", "metadata.json", "rng/rank_00000.pt"} <= set(files)
    assert all(e["size"] == os.path.getsize(good / n) for n, e in files.items())
    assert verify_manifest(str(good)) is True
    # per-rank partial lists merged by rank 0 give the same manifest as rank 0 alone
    names = list_files(str(good))
    parts = [file_entries(str(good), names[r::3]) for r in range(3)]
    assert merge_entries(parts) == files
    copy = tmp_path / "copy"
    shutil.copytree(good, copy)
    write_manifest(str(copy), merge_entries(parts))
    assert read_manifest(str(copy)) == files and verify_manifest(str(copy), rank=1, world=2)
    # no manifest: accepted, verification skipped; the weights load right
    (copy / MANIFEST).unlink()
    assert verify_manifest(str(copy)) is False
    _same(_load(copy), weights)


def test_manifest_catches_every_file_damaged(checkpoints, tmp_path):
    """Each file truncated by one byte, or one byte flipped: the manifest names it."""
    from convert.files import CheckpointError
    from engine.manifest import list_files, verify_manifest

    good, _, _ = checkpoints
    for n in list_files(str(good)):
        for how in ("truncate", "flip"):
            copy = tmp_path / f"{how}-{n.replace('/', '_')}"
            shutil.copytree(good, copy)
            _damage_bytes(copy / n, how, 0.999, 1)
            with pytest.raises(CheckpointError, match=str(copy / n).replace(".", r"\.")):
                for rank in range(2):  # the checksum is checked by one rank of two
                    verify_manifest(str(copy), rank, 2)


_DAMAGE = st.sampled_from(["truncate", "flip", "append", "empty", "delete", "bf16", "wide"])


def _apply(copy: Path, name: str, how: str, at: float, mask: int, others: dict) -> bool:
    target = copy / name
    if how in others:
        src = others[how] / name
        if not src.exists():
            return False
        same = target.exists() and src.read_bytes() == target.read_bytes()
        shutil.copyfile(src, target)
        return not same
    return _damage_bytes(target, how, at, mask)


@fuzz(150)
@given(data=st.data(), how=_DAMAGE, at=st.floats(0, 1), mask=st.integers(1, 255))
def test_damaged_checkpoint_with_manifest(checkpoints, data, how, at, mask):
    """Verified first (what resume must do): every change of a listed file's bytes is one
    CheckpointError naming it; a damaged manifest is one naming the manifest (or the file whose
    entry it changed); whatever passes loads the right tensors."""
    from convert.files import CheckpointError
    from engine.manifest import MANIFEST, list_files, verify_manifest

    good, weights, others = checkpoints
    name = data.draw(st.sampled_from(list_files(str(good)) + [MANIFEST]), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "iter_0000003"
        shutil.copytree(good, copy)
        changed = _apply(copy, name, how, at, mask, others)
        try:
            verified = verify_manifest(str(copy))
        except CheckpointError as e:
            event(f"caught by the manifest ({how})")
            if name != MANIFEST:
                assert str(copy / name) in str(e), str(e)
            else:
                assert names_file(e, copy), str(e)
            return
        assert not changed or name == MANIFEST, f"{name} damaged ({how}) but the manifest passed"
        if verified is False:  # the manifest itself was deleted: structural checks only
            return
        _same(_load(copy), weights)


@fuzz(150)
@given(data=st.data(), how=_DAMAGE, at=st.floats(0, 1), mask=st.integers(1, 255))
def test_damaged_checkpoint_without_manifest(checkpoints, data, how, at, mask):
    """A checkpoint of Megatron-LM or an older meshtron (no manifest): structural damage (a file
    truncated, emptied or missing, a small file garbled, a shard of another dtype or shape) is one
    error naming the checkpoint; what loads is right. Flipped bytes inside tensor data or the
    training state's numbers are what only the manifest can catch, so they are not fuzzed here."""
    from convert.files import CheckpointError
    from engine.manifest import MANIFEST, list_files

    good, weights, others = checkpoints
    # rng/: see test_damaged_rng_state_names_the_file; a flip in meshtron_train.pt can change a
    # step number and leave a valid pickle (test_training_state_without_its_keys_names_the_file)
    names = [n for n in list_files(str(good)) if not n.startswith("rng/")
             and not (how == "flip" and (n.endswith(".distcp") or n == "meshtron_train.pt"))]
    name = data.draw(st.sampled_from(names), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "iter_0000003"
        shutil.copytree(good, copy)
        (copy / MANIFEST).unlink()
        changed = _apply(copy, name, how, at, mask, others)
        try:
            loaded = _load(copy)
            event(f"loaded ({how})")
        except (CheckpointError, ValueError, FileNotFoundError) as e:
            event(f"{type(e).__name__} ({how})")
            assert names_file(e, copy), f"{type(e).__name__} does not name {copy}: {e}"
            return
        if name.startswith("rng/") or not changed:
            return  # RNG states are not tensors of the model: only the manifest guards them
        _same(loaded, weights)


def test_damaged_rng_state_names_the_file(checkpoints, tmp_path):
    from convert.files import CheckpointError
    from engine.manifest import MANIFEST

    good, _, _ = checkpoints
    copy = tmp_path / "iter_0000003"
    shutil.copytree(good, copy)
    (copy / MANIFEST).unlink()
    _damage_bytes(copy / "rng" / "rank_00000.pt", "truncate", 0.5, 1)
    with pytest.raises(CheckpointError, match="rank_00000.pt"):
        _load(copy)


def test_training_state_without_its_keys_names_the_file(checkpoints, tmp_path):
    """What a flipped byte in a key of the pickle gives (found by the fuzzer at 6x examples)."""
    from convert.files import CheckpointError
    from engine.manifest import MANIFEST

    good, _, _ = checkpoints
    copy = tmp_path / "iter_0000003"
    shutil.copytree(good, copy)
    (copy / MANIFEST).unlink()
    torch.save({"step": 3, "optimizer_step": 3}, copy / "meshtron_train.pt")
    with pytest.raises(CheckpointError, match="meshtron_train.pt"):
        _load(copy)


def test_bytes_of_dcp_metadata_flipped_one_by_one(checkpoints, tmp_path):
    """A flipped byte in ``.metadata`` can leave a valid pickle of the wrong shape (the CI fuzzer
    once renamed ``_StorageInfo.offset``). Every third byte flipped in turn (two masks; ~12 s): the
    checkpoint either opens and reads every tensor exactly as saved, or gives one CheckpointError
    naming the checkpoint."""
    from convert.dcp_io import DistCheckpoint
    from convert.files import CheckpointError

    good, _, _ = checkpoints
    copy = tmp_path / "iter_0000003"
    shutil.copytree(good, copy)
    ref_ckpt = DistCheckpoint(str(copy))
    reference = {k: ref_ckpt.read_whole(k) for k in ref_ckpt.tensor_keys()}
    original = (copy / ".metadata").read_bytes()
    outcomes = {"error": 0, "same": 0}
    for pos in range(0, len(original), 3):
        damaged = bytearray(original)
        damaged[pos] ^= 0x50 if pos % 2 else 0x01
        (copy / ".metadata").write_bytes(bytes(damaged))
        try:
            ckpt = DistCheckpoint(str(copy))
            if (ckpt.metadata.state_dict_metadata == ref_ckpt.metadata.state_dict_metadata
                    and ckpt.metadata.storage_data == ref_ckpt.metadata.storage_data):
                outcomes["same"] += 1
                continue
            for key in set(ckpt.tensor_keys()) & reference.keys():
                got = ckpt.read_whole(key)
                assert got.dtype == reference[key].dtype and torch.equal(got, reference[key]), \
                    f"byte {pos}: {key} read silently wrong"
            outcomes["same"] += 1
        except CheckpointError as e:
            assert str(copy) in str(e), f"byte {pos}: {e}"
            outcomes["error"] += 1
    assert outcomes["error"] > len(original) // 6, outcomes
