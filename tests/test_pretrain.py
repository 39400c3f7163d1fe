"""recipe: pretrain — the token stream, its sequences and labels against a direct construction from
the documents, both attention modes, the readers (tokenized records, text records, a datasets
save_to_disk directory, Megatron indexed prefixes and blends), their errors before any process
group, mesh-exactness on every axis and schedule, and exact resume (the data position included)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.pretrain import PretrainSequences
from engine.data.store import MemoryStore
from engine.loss import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "configs" / "data" / "tiny" / "tokenizer"


def documents(num: int, seed: int, vocab: int = 300, lo: int = 3, hi: int = 90):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(num)]


def reference_stream(docs, seed, epochs):
    """Epoch after epoch of the documents in PretrainSequences' shuffled order, with each token's
    document-end flag (the engine's order is checked against an independent walk of it)."""
    toks, ends = [], []
    for e in range(epochs):
        order = np.random.Generator(np.random.PCG64([seed, e])).permutation(len(docs))
        for d in order:
            toks += docs[d]
            ends += [False] * (len(docs[d]) - 1) + [True]
    return np.array(toks), np.array(ends)


@pytest.mark.parametrize("cross", [False, True])
def test_sequences_follow_the_stream(cross):
    docs = documents(40, seed=1)
    S, seed = 64, 7
    ds = PretrainSequences(MemoryStore([(d, None) for d in docs]), S, seed, cross_document_attention=cross)
    total = sum(map(len, docs))
    assert ds.tokens_per_epoch == total and ds.sequences_per_epoch == total // S
    n = 2 * ds.sequences_per_epoch + 3  # into the third epoch: epochs chain, nothing is dropped
    toks, ends = reference_stream(docs, seed, 4)
    for k in range(n):
        b = ds.sequence(k)
        want = toks[k * S:(k + 1) * S]
        assert b.tokens.tolist() == want.tolist()
        nxt = toks[k * S + 1:(k + 1) * S + 1]
        doc_end = ends[k * S:(k + 1) * S]
        if cross:
            assert b.labels.tolist() == nxt.tolist()
            assert b.cu_seqlens.tolist() == [0, S] and b.position_ids.tolist() == list(range(S))
        else:
            assert b.labels.tolist() == np.where(doc_end, IGNORE_INDEX, nxt).tolist()
            # segments: cut after every document end, positions restart in each
            cuts = [0] + [i + 1 for i in np.flatnonzero(doc_end[:-1])] + [S]
            assert b.cu_seqlens.tolist() == cuts
            pos = np.concatenate([np.arange(b - a) for a, b in zip(cuts[:-1], cuts[1:])])
            assert b.position_ids.tolist() == pos.tolist()
        assert ds.valid_tokens(k) == b.num_valid


def test_target_masks_and_valid_counts():
    docs = documents(30, seed=2)
    rng = np.random.default_rng(3)
    masks = [(rng.random(len(d)) < 0.6).tolist() for d in docs]
    S = 48
    for cross in (False, True):
        ds = PretrainSequences(MemoryStore(list(zip(docs, masks))), S, 5, cross)
        plain = PretrainSequences(MemoryStore([(d, None) for d in docs]), S, 5, cross)
        toks, _ = reference_stream(docs, 5, 2)
        tmask = np.concatenate([np.array(masks[d]) for e in range(2)
                                for d in np.random.Generator(np.random.PCG64([5, e])).permutation(len(docs))])
        for k in range(ds.sequences_per_epoch + 2):
            b, p = ds.sequence(k), plain.sequence(k)
            assert torch.equal(b.tokens, p.tokens) and torch.equal(b.cu_seqlens, p.cu_seqlens)
            target_of = tmask[k * S + 1:(k + 1) * S + 1]  # the label of t is token t+1, if it is a target
            want = np.where(target_of & (p.labels.numpy() != IGNORE_INDEX), p.labels.numpy(), IGNORE_INDEX)
            assert b.labels.tolist() == want.tolist()
            assert ds.valid_tokens(k) == b.num_valid


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cfg_for(overrides):
    from engine.config import load_config, validate

    base = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=300",
            "data.seq_len=64", "train.global_batch_size=4", "recipe=pretrain", "data.source=files"]
    return validate(load_config(None, base + list(overrides)), 1)


def test_tokenized_records(tmp_path):
    from engine.data.sft import TokenizedSFTDataset
    from engine.train import build_dataset

    docs = documents(20, seed=4, hi=60)
    recs = [{"input_ids": d} for d in docs[:10]]
    recs += [{"input_ids": d, "labels": [-100] * 2 + d[2:]} for d in docs[10:15]]
    recs += [{"input_ids": d, "loss_mask": [0] * 3 + [1] * (len(d) - 3)} for d in docs[15:]]
    path = write_jsonl(tmp_path / "tok.jsonl", recs)
    ds = build_dataset(cfg_for(["data.format=tokenized", f"data.path={path}"]))
    assert isinstance(ds, PretrainSequences) and ds.store.num_documents == 20
    assert ds.store.targets(12).tolist() == [False] * 2 + [True] * (len(docs[12]) - 2)
    sft = build_dataset(cfg_for(["recipe=sft", "data.format=tokenized", f"data.path={path}"]))
    assert isinstance(sft, TokenizedSFTDataset)
    seen = {}
    for i in range(sft.sequences_per_epoch):
        b = sft.sequence(i)
        assert b.num_tokens == 64 and sft.valid_tokens(i) == b.num_valid
        for a, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
            seen[tuple(b.tokens[a:e].tolist())] = b.labels[a:e].tolist()
    for d, r in zip(docs, recs):  # every document once, nothing appended, labels shifted inside it
        mask = [l != -100 for l in r["labels"]] if "labels" in r else (
            [bool(m) for m in r["loss_mask"]] if "loss_mask" in r else [True] * len(d))
        assert seen[tuple(d)] == [d[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(d) - 1)] + [IGNORE_INDEX]


def test_text_and_hf_directory(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    from engine.train import build_dataset

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    texts = [" ".join(f"k{i % 100} = v{(3 * i) % 100} ;" for i in range(j, j + 5 + j % 7)) for j in range(30)]
    want = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    jsonl = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    over = [f"data.tokenizer={TOKENIZER}", "model.vocab_size=300"]
    a = build_dataset(cfg_for(over + ["data.format=text", f"data.path={jsonl}"]))
    assert [a.store.tokens(d).tolist() for d in range(30)] == want
    hf_text = tmp_path / "hf_text"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(hf_text))
    b = build_dataset(cfg_for(over + ["data.format=hf", f"data.path={hf_text}"]))
    assert [b.store.tokens(d).tolist() for d in range(30)] == want
    assert torch.equal(a.sequence(3).tokens, b.sequence(3).tokens)
    hf_ids = tmp_path / "hf_ids"
    datasets.Dataset.from_dict({"input_ids": want}).save_to_disk(str(hf_ids), max_shard_size="1KB")
    c = build_dataset(cfg_for(["data.format=hf", f"data.path={hf_ids}"]))
    assert [c.store.tokens(d).tolist() for d in range(30)] == want


def test_hf_directory_of_conversations(tmp_path):
    """An HF directory with a messages column trains SFT exactly as the same records in JSONL."""
    import datasets

    from engine.train import build_dataset

    src = ROOT / "configs" / "data" / "tiny" / "sft.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()[:40]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    over = ["recipe=sft", f"data.tokenizer={TOKENIZER}", "data.seq_len=128"]
    a = build_dataset(cfg_for(over + ["data.format=messages", f"data.path={tmp_path / 'hf'}"]))
    write_jsonl(tmp_path / "sft.jsonl", rows)
    b = build_dataset(cfg_for(over + ["data.format=messages", f"data.path={tmp_path / 'sft.jsonl'}"]))
    assert a.sequences_per_epoch == b.sequences_per_epoch
    for i in range(a.sequences_per_epoch):
        assert torch.equal(a.sequence(i).tokens, b.sequence(i).tokens)
        assert torch.equal(a.sequence(i).labels, b.sequence(i).labels)


@pytest.mark.parametrize("record, expect", [
    ({"input_ids": [1, 2, "x"]}, "'input_ids': expected a list of integer token ids"),
    ({"input_ids": [1, 2, 300]}, "token id 300 is outside [0, model.vocab_size=300)"),
    ({"input_ids": [1, 2, 3], "labels": [1, 5, 3]}, "'labels'[1]=5: expected input_ids[1]=2 or -100"),
    ({"input_ids": [1, 2, 3], "loss_mask": [1, 1]}, "'loss_mask': expected a list of 3 values 0 or 1"),
    ({"text": "hello"}, "'input_ids': expected a list of integer token ids, got nothing"),
])
def test_bad_records_name_the_line(tmp_path, record, expect):
    from engine.data.records import DataError
    from engine.train import build_dataset

    path = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 2, 3, 4]}] * 3 + [record])
    with pytest.raises(DataError) as e:
        build_dataset(cfg_for(["data.format=tokenized", f"data.path={path}"]))
    assert f"{path}:4: " in str(e.value) and expect in str(e.value)


def test_cli_reports_bad_data_before_any_process_group(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [1, 9999]}])
    r = subprocess.run([sys.executable, "-m", "engine.cli", str(ROOT / "configs" / "tiny.yaml"), "recipe=pretrain",
                        "data.source=files", "data.format=tokenized", f"data.path={path}",
                        f"train.output_dir={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "WORLD_SIZE": "2", "RANK": "0",  # no rendezvous is reached
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    assert r.returncode == 2, r.stderr
    assert f"{path}:2: token id 9999 is outside [0, model.vocab_size=512)" in r.stderr
    assert "Traceback" not in r.stderr


PRETRAIN_MESHES = [["parallel.tp=2", "parallel.cp=2"],
                   ["parallel.dp=2", "parallel.pp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"],
                   ["parallel.cp=2", "parallel.sp_mode=ulysses", "parallel.pp=2"]]


def pretrain_world(rank, world, data_overrides):
    """Both attention modes, every mesh of PRETRAIN_MESHES against the single process (the GQA
    Llama of test_tp_exact: the data path is what is new here, the model's exactness is theirs)."""
    from engine.mesh import ParallelMesh
    from tests.test_tp_exact import MODELS, compare, make_cfg, run_steps

    report = {}
    for cross in ("false", "true"):
        over = MODELS["llama-gqa"] + ["recipe=pretrain", "data.source=files",
                                      f"data.cross_document_attention={cross}", *data_overrides]
        ref = run_steps(make_cfg(over + ["parallel.dp=1"], 1), ParallelMesh.single())
        for mesh_over in PRETRAIN_MESHES:
            p = make_cfg(over + mesh_over, world).parallel
            mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, placement=p.placement)
            report[(f"cross={cross}", " ".join(mesh_over))] = compare(run_steps(make_cfg(over + mesh_over, world),
                                                                             mesh), ref)
    return report


def test_pretrain_mesh_exact(tmp_path):
    """Loss, gradients and weights after 3 steps equal the single process on tp×cp, dp×pp with
    Seq1F1B, and Ulysses cp×pp, with document boundaries kept and with plain concatenation."""
    from tests.harness import run_world
    from tests.test_tp_exact import check_reports

    path = write_jsonl(tmp_path / "corpus.jsonl", [{"input_ids": d} for d in documents(60, seed=9, hi=150)])
    check_reports(run_world(4, pretrain_world, ["data.format=tokenized", f"data.path={path}"], timeout=1200))


def test_pretrain_resume_is_bit_exact(tmp_path):
    """4 steps straight equal 2 steps + resume + 2 steps bit for bit: the data position is the step."""
    from tests.test_resume import losses, train

    path = write_jsonl(tmp_path / "corpus.jsonl", [{"input_ids": d} for d in documents(80, seed=11, hi=400,
                                                                                         vocab=512)])
    data = ["recipe=pretrain", "data.source=files", "data.format=tokenized", f"data.path={path}",
            "train.global_batch_size=4"]
    train(tmp_path / "straight", "train.steps=4", "checkpoint.every=2", *data)
    straight = losses(tmp_path / "straight")
    ckpt = tmp_path / "straight" / "checkpoints" / "iter_0000002"
    train(tmp_path / "resumed", "train.steps=4", f"train.resume={ckpt}", *data)
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == [2, 3] and [resumed[s] for s in (2, 3)] == [straight[s] for s in (2, 3)]


def write_indexed(prefix: Path, docs, dtype=np.uint16) -> str:
    from engine.data.indexed import IndexedTokensWriter

    w = IndexedTokensWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return str(prefix)


@pytest.mark.parametrize("cross", [False, True])
def test_megatron_prefix_equals_the_same_documents_in_memory(tmp_path, cross):
    from engine.data.store import IndexedStore
    from engine.train import build_dataset

    docs = documents(50, seed=12)
    prefix = write_indexed(tmp_path / "corpus_text_document", docs)
    ds = build_dataset(cfg_for(["data.format=megatron", f"data.path={prefix}",
                                f"data.cross_document_attention={str(cross).lower()}"]))
    assert isinstance(ds.store, IndexedStore)
    ref = PretrainSequences(MemoryStore([(d, None) for d in docs]), 64, ds.seed, cross)
    for k in range(ds.sequences_per_epoch + 3):
        a, b = ds.sequence(k), ref.sequence(k)
        for f in ("tokens", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (k, f)
        assert ds.valid_tokens(k) == b.num_valid


def test_megatron_blend(tmp_path):
    from engine.config import load_config, validate
    from engine.data.blend import blend_indices
    from engine.data.pretrain import BlendedSequences
    from engine.train import build_dataset

    a = write_indexed(tmp_path / "a_text_document", documents(30, seed=13))
    b = write_indexed(tmp_path / "b_text_document", documents(30, seed=14, vocab=50))
    yaml = tmp_path / "blend.yaml"
    yaml.write_text(f"recipe: pretrain\ndata:\n  source: files\n  format: megatron\n  seq_len: 64\n"
                    f"  path: [0.3, {a}, 0.7, {b}]\nmodel:\n  vocab_size: 300\n  num_layers: 2\n"
                    f"  hidden_size: 64\n  ffn_hidden_size: 96\ntrain:\n  global_batch_size: 4\n")
    ds = build_dataset(validate(load_config(str(yaml)), 1))
    assert isinstance(ds, BlendedSequences) and ds.weights == pytest.approx([0.3, 0.7])
    which, sample = blend_indices([0.3, 0.7], 200)
    for i in range(200):
        got = ds.sequence(i)
        want = ds.datasets[which[i]].sequence(sample[i])
        assert torch.equal(got.tokens, want.tokens) and ds.valid_tokens(i) == want.num_valid
    from_b = sum(int(ds.sequence(i).tokens.max()) < 50 for i in range(200))
    assert abs(from_b - 140) <= 1  # 70 % of the sequences come from b (its ids are all < 50)


def test_megatron_errors_name_the_file(tmp_path):
    from engine.config import ConfigError
    from engine.data.records import DataError
    from engine.train import build_dataset

    prefix = write_indexed(tmp_path / "c_text_document", documents(10, seed=15))
    with pytest.raises(ConfigError, match=r"no Megatron indexed dataset at prefix .*missing_text_document"):
        cfg_for(["data.format=megatron", f"data.path={tmp_path / 'missing_text_document'}"])
    with pytest.raises(ConfigError, match=r"data.path: .*"):
        cfg_for(["data.format=megatron", f"data.path=[0.5, {prefix}, 0.5]"])
    big = write_indexed(tmp_path / "d_text_document", documents(10, seed=16) + [[5, 400, 7]])
    with pytest.raises(DataError, match=r"d_text_document.bin: token id 400 in document 10 is >= model.vocab_size=300"):
        build_dataset(cfg_for(["data.format=megatron", f"data.path={big}"]))
    raw = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(raw[:-2])
    with pytest.raises(DataError, match=r"c_text_document.bin"):
        build_dataset(cfg_for(["data.format=megatron", f"data.path={prefix}"]))
    with pytest.raises(ConfigError, match="recipe=pretrain reads a token stream; data.format=messages"):
        cfg_for(["data.format=messages", f"data.path={prefix}.bin"])


def test_readme_flow_preprocess_pretrain_export(tmp_path):
    """The README's flow: preprocess JSONL text → pretrain at pp2 × cp2 (4 processes; the same
    losses as one process) → a Hugging Face export transformers loads."""
    from transformers import AutoModelForCausalLM

    from tests.test_resume import losses

    corpus = ROOT / "configs" / "data" / "tiny" / "corpus.jsonl"
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--json-keys", "text",
                        "--output-prefix", str(tmp_path / "corpus"), "--tokenizer-type", "HuggingFaceTokenizer",
                        "--tokenizer-model", str(TOKENIZER), "--append-eod", "--workers", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shipped = ROOT / "configs" / "data" / "tiny" / "corpus_text_document"
    for ext in (".bin", ".idx"):  # the shipped corpus is this command's output
        assert (tmp_path / f"corpus_text_document{ext}").read_bytes() == Path(f"{shipped}{ext}").read_bytes()
    import os

    def run(out, nproc, *extra):
        env = dict(os.environ, OMP_NUM_THREADS="1", NPROC_PER_NODE=str(nproc), PYTHON=sys.executable)
        cmd = ["bash", "tools/launch.sh"] if nproc > 1 else [sys.executable, "-m", "engine.cli"]
        p = subprocess.run(cmd + [str(ROOT / "configs" / "tiny-pretrain.yaml"), f"train.output_dir={out}",
                                  f"data.path={tmp_path / 'corpus_text_document'}", "train.steps=3",
                                  "checkpoint.save_final=false", *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return losses(out)

    mesh = run(tmp_path / "mesh", 4, "parallel.pp=2", "parallel.cp=2", f"checkpoint.export_hf={tmp_path / 'hf'}")
    single = run(tmp_path / "single", 1)
    assert mesh == pytest.approx(single, rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    from engine.data.indexed import IndexedTokens

    ids = torch.from_numpy(IndexedTokens(str(shipped)).document(0).astype(np.int64))[None]
    out = model(input_ids=ids, labels=ids)
    loss = float(out.loss.detach())
    assert np.isfinite(loss) and loss < np.log(512)  # trained: below a uniform guess
