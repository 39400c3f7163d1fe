"""The tokenized data cache (engine/data/cache.py): the same sequences as tokenizing at start (SFT
and DPO), a build shared by the ranks of a node, reuse without tokenizing, and a stale or damaged
cache detected and rebuilt, never trusted; the training losses are identical with and without it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data" / "tiny"


def cfg_for(tmp_path, *overrides, recipe="sft"):
    from engine.config import load_config, validate

    data = "sft.jsonl" if recipe == "sft" else "dpo.jsonl"
    base = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", f"recipe={recipe}",
            "data.source=files", f"data.path={tmp_path / data}", f"data.tokenizer={DATA / 'tokenizer'}",
            f"data.seq_len={128 if recipe == 'sft' else 512}", f"data.cache_dir={tmp_path / 'cache'}", "train.global_batch_size=4"]
    return validate(load_config(None, base + list(overrides)), 1)


@pytest.fixture
def data(tmp_path):
    for name in ("sft.jsonl", "dpo.jsonl"):
        lines = (DATA / name).read_text().splitlines()[:120]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path


def same_sequences(a, b, n=12):
    """``a`` a dataset or a list of its first sequences, ``b`` a dataset."""
    for i in range(n):
        x, y = (a[i] if isinstance(a, list) else a.sequence(i)), b.sequence(i)
        if isinstance(x, tuple):  # DPO: (batch, segment ids)
            assert torch.equal(x[1], y[1])
            x, y = x[0], y[0]
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.cu_seqlens, y.cu_seqlens)
        if hasattr(a, "valid_tokens"):
            assert a.valid_tokens(i) == b.valid_tokens(i)
        elif hasattr(b, "valid_tokens"):
            assert y.num_valid == b.valid_tokens(i)


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_cache_gives_the_same_sequences(data, recipe, monkeypatch):
    from engine.data import chat
    from engine.train import build_dataset

    plain = build_dataset(cfg_for(data, "data.cache=false", recipe=recipe))
    cached = build_dataset(cfg_for(data, recipe=recipe))
    if recipe == "sft":
        assert plain.sequences_per_epoch == cached.sequences_per_epoch
        assert plain.stats == cached.stats
    same_sequences(plain, cached)
    ref = [plain.sequence(i) for i in range(12)]
    # the second start memory-maps: no chat template is rendered
    monkeypatch.setattr(chat, "render", lambda *a, **k: pytest.fail("tokenized again"))
    again = build_dataset(cfg_for(data, recipe=recipe))
    same_sequences(ref, again)


def test_stale_and_damaged_caches_are_rebuilt(data, capsys):
    from engine.train import build_dataset

    cfg = cfg_for(data)
    ref = build_dataset(cfg)
    (root,) = [p for p in (data / "cache").iterdir()]
    capsys.readouterr()
    # damage: a truncated .bin, a flipped byte in an .idx, a missing manifest
    bins = sorted(root.glob("*.bin"))
    bins[0].write_bytes(bins[0].read_bytes()[:-3])
    same_sequences(ref, build_dataset(cfg))
    assert "has another size" in capsys.readouterr().out
    idx = sorted(root.glob("*.idx"))[0]
    raw = bytearray(idx.read_bytes())
    raw[-1] ^= 0xFF
    idx.write_bytes(bytes(raw))
    same_sequences(ref, build_dataset(cfg))
    assert "fails its checksum" in capsys.readouterr().out
    (root / "manifest.json").unlink()
    same_sequences(ref, build_dataset(cfg))
    assert "no cache yet" in capsys.readouterr().out
    # stale: the data file changes -> a new key, a new cache with the new records
    lines = (data / "sft.jsonl").read_text().splitlines()
    (data / "sft.jsonl").write_text("\n".join(lines[:60]) + "\n")
    fresh = build_dataset(cfg)
    assert fresh.stats["records"] == 60 and len(list((data / "cache").iterdir())) == 2


def build_rank(args):
    """One rank of a node building the cache (run in a subprocess with LOCAL_RANK set)."""
    tmp, rank = Path(args[0]), int(args[1])
    from engine.train import build_dataset

    ds = build_dataset(cfg_for(tmp))
    print(json.dumps({"rank": rank, "sequences": ds.sequences_per_epoch, "stats": ds.stats}))


def build_node(data, ranks, local_world):
    """Processes building the cache at once, one per LOCAL_RANK; -> their reports and the cache dir."""
    code = "import sys; from tests.test_data_cache import build_rank; build_rank(sys.argv[1:])"
    procs = []
    for rank in ranks:
        env = dict(os.environ, LOCAL_RANK=str(rank), TORCHELASTIC_RUN_ID="t1", OMP_NUM_THREADS="1")
        env.pop("LOCAL_WORLD_SIZE", None)
        if local_world:
            env["LOCAL_WORLD_SIZE"] = str(local_world)
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(data), str(rank)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    reports = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert all(r["sequences"] == reports[0]["sequences"] and r["stats"] == reports[0]["stats"] for r in reports)
    (root,) = [p for p in (data / "cache").iterdir() if ".build-" not in p.name]
    assert not [p for p in (data / "cache").iterdir() if ".build-" in p.name]  # no build left behind
    return reports, root


def test_ranks_of_a_node_build_their_shares(data):
    _, root = build_node(data, range(2), 2)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["parts"] == 2 and manifest["stats"]["records"] == 120
    parts = [len(__import__("numpy").load(root / f"part-{r}-positions.npy")) for r in range(2)]
    assert parts == [60, 60]  # each rank encoded half
    from engine.train import build_dataset

    same_sequences(build_dataset(cfg_for(data, "data.cache=false")), build_dataset(cfg_for(data)))


def test_ranks_without_local_world_size_each_build_alone(data):
    """A launcher that sets LOCAL_RANK but not LOCAL_WORLD_SIZE (the CI failure of a spawned world:
    rank 0 believed it was alone, renamed the shared build away under rank 3): every rank builds the
    whole cache in its own directory, the first rename wins, and all read the same records."""
    _, root = build_node(data, [0, 3], None)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["parts"] == 1 and manifest["stats"]["records"] == 120


def test_an_inconsistent_local_rank_is_one_error(data, monkeypatch):
    from engine.data.records import DataError
    from engine.train import build_dataset

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(DataError, match="LOCAL_RANK=3 with LOCAL_WORLD_SIZE=2"):
        build_dataset(cfg_for(data))


def test_a_bad_record_in_any_share_is_one_error(data):
    from engine.data.records import DataError
    from engine.train import build_dataset

    with open(data / "sft.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:121: .*end with a assistant turn"):
        build_dataset(cfg_for(data))
    assert not [p for p in (data / "cache").iterdir() if ".build-" not in p.name]  # never renamed into place


def test_training_losses_identical_with_and_without_cache(data):
    from tests.test_resume import losses, train

    common = ["recipe=sft", "data.source=files", f"data.path={data / 'sft.jsonl'}",
              f"data.tokenizer={DATA / 'tokenizer'}", "data.format=messages", "data.seq_len=256",
              "train.steps=3", "checkpoint.save_final=false", f"data.cache_dir={data / 'cache'}"]
    train(data / "plain", *common, "data.cache=false")
    train(data / "cached", *common)  # builds the cache, then trains from it (a restart reads it:
    assert losses(data / "plain") == losses(data / "cached")  # test_cache_gives_the_same_sequences)


def test_preprocess_builds_the_cache_ahead_of_time(data):
    """tools/preprocess_data.py --cache CONFIG --workers 2 builds what the run then reads."""
    from engine.data import chat
    from engine.train import build_dataset

    over = [f"data.path={data / 'sft.jsonl'}", f"data.tokenizer={DATA / 'tokenizer'}",
            f"data.cache_dir={data / 'cache'}", "data.seq_len=128"]
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--cache", str(ROOT / "configs" / "tiny-sft.yaml"),
                        *over, "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["stats"]["records"] == 120
    from engine.config import load_config

    render = chat.render
    chat.render = lambda *a, **k: pytest.fail("tokenized again")
    try:
        ds = build_dataset(load_config(str(ROOT / "configs" / "tiny-sft.yaml"), over))
    finally:
        chat.render = render
    assert ds.stats["records"] == 120
