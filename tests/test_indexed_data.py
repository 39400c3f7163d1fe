"""Megatron indexed datasets (engine/data/indexed.py) against megatron-core itself: files written by
its ``IndexedDatasetBuilder`` read identically, files we write read identically by its
``IndexedDataset``, damaged files rejected with the file named, ``--data-path`` blends parsed as
Megatron does and blended bit for bit as its ``helpers_cpp.build_blending_indices``; and
tools/preprocess_data.py's output equals the tokenizer's ids for any number of workers."""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import engine.data.blend as ix  # noqa: E402
from engine.data.blend import blend_indices, parse_blend  # noqa: E402
from engine.data.indexed import IndexedDataError, IndexedTokens, IndexedTokensWriter, best_dtype  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from megatron.core.datasets.utils import get_blend_from_list, normalize

_RERUN = ix._rerun_one
DOCS = [[5, 6, 7], [8], list(range(100, 140)), [1, 2, 3, 4, 5, 6, 7, 8, 9], [65000, 3]]


def _megatron_write(prefix: str, dtype) -> list[list[list[int]]]:
    """Documents of one or several sequences (and an empty one) via megatron-core's builder;
    returns each document's sequences."""
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    docs = [[[5, 6, 7]], [[8], [9, 10]], [], [[int(x) for x in range(300, 340)]]]
    b.add_item(torch.tensor(docs[0][0]))
    b.end_document()
    b.add_document(np.array([8, 9, 10]), lengths=[1, 2])  # one document of two sequences
    b.end_document()  # an empty document: no sequences
    for seq in docs[3]:
        b.add_item(torch.tensor(seq))
    b.end_document()
    b.finalize(prefix + ".idx")
    return docs


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reads_megatron_builder_files(tmp_path, dtype):
    prefix = str(tmp_path / "mc")
    docs = _megatron_write(prefix, dtype)
    ours, ref = IndexedTokens(prefix), IndexedDataset(prefix, mmap=True)
    assert ours.dtype == np.dtype(dtype) and ours.num_sequences == len(ref) == 4
    assert ours.num_documents == len(docs) and np.array_equal(ours.document_indices, ref.document_indices)
    assert np.array_equal(ours.sequence_lengths, ref.sequence_lengths)
    for i in range(len(ref)):
        assert np.array_equal(ours.sequence(i), ref[i]) and ours.sequence(i).dtype == ref[i].dtype
    flat = np.concatenate([ref[i] for i in range(len(ref))])
    assert ours.num_tokens == flat.size and np.array_equal(ours.tokens(0, flat.size), flat)
    starts, ends = ours.document_bounds()
    for d, seqs in enumerate(docs):
        want = [t for s in seqs for t in s]
        assert np.array_equal(ours.document(d), want)
        assert np.array_equal(ours.tokens(int(starts[d]), int(ends[d])), want)
    assert ours.max_token_id() == 339 and ours.max_token_id(chunk=3) == 339


def test_megatron_reads_our_files(tmp_path):
    for dtype in (np.uint16, np.int32, np.int64):
        prefix = str(tmp_path / f"ours_{np.dtype(dtype).name}")
        with IndexedTokensWriter(prefix, dtype) as w:
            for doc in DOCS:
                w.add_document(doc if len(doc) % 2 else np.asarray(doc))
        ref = IndexedDataset(prefix, mmap=True)
        assert len(ref) == len(DOCS) and ref.index.dtype == dtype
        assert np.array_equal(ref.document_indices, np.arange(len(DOCS) + 1))
        for i, doc in enumerate(DOCS):
            assert np.array_equal(ref[i], doc)
        assert np.array_equal(IndexedTokens(prefix).document(4), DOCS[4])
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(ValueError, match="token id 70000 does not fit uint16"):
        IndexedTokensWriter(str(tmp_path / "x"), np.uint16).add_document([1, 70000])
    with pytest.raises(RuntimeError), IndexedTokensWriter(str(tmp_path / "aborted"), np.int32) as w:
        w.add_document([1, 2])
        raise RuntimeError("stop")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("aborted")]
    assert best_dtype(32000) is np.uint16 and best_dtype(65500) is np.int32 and best_dtype(None) is np.int32


def _copy(tmp_path, name, src) -> str:
    dst = str(tmp_path / name)
    for ext in (".bin", ".idx"):
        shutil.copy(src + ext, dst + ext)
    return dst


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_damaged_files_are_rejected_naming_the_file(tmp_path):
    good = str(tmp_path / "good")
    with IndexedTokensWriter(good, np.uint16) as w:
        for doc in DOCS:
            w.add_document(doc)
    n = sum(map(len, DOCS))

    def expect(prefix, ext, *fragments):
        with pytest.raises(IndexedDataError) as e:
            IndexedTokens(prefix)
        assert prefix + ext in str(e.value), str(e.value)
        for f in fragments:
            assert f in str(e.value), str(e.value)

    p = _copy(tmp_path, "short_bin", good)
    os.truncate(p + ".bin", 2 * n - 2)
    expect(p, ".bin", f"{2 * n - 2} bytes, expected {2 * n}", "truncated")
    p = _copy(tmp_path, "long_bin", good)
    with open(p + ".bin", "ab") as f:
        f.write(b"\0\0")
    expect(p, ".bin", f"{2 * n + 2} bytes, expected {2 * n}")
    p = _copy(tmp_path, "v2", good)
    _patch(p + ".idx", 9, (2).to_bytes(8, "little"))
    expect(p, ".idx", "version 2, expected 1")
    p = _copy(tmp_path, "code9", good)
    _patch(p + ".idx", 17, bytes([9]))
    expect(p, ".idx", "unknown dtype code 9")
    p = _copy(tmp_path, "short_idx", good)
    os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8)
    expect(p, ".idx", "truncated")
    p = _copy(tmp_path, "magic", good)
    _patch(p + ".idx", 0, b"NOTANIDX!")
    expect(p, ".idx", "MMIDIDX")
    p = _copy(tmp_path, "pointer", good)
    _patch(p + ".idx", 34 + 4 * len(DOCS) + 8, (7).to_bytes(8, "little"))  # sequence 1's pointer
    expect(p, ".idx", "sequence 1 points at byte 7, expected 6")
    p = _copy(tmp_path, "docidx", good)
    _patch(p + ".idx", 34 + 12 * len(DOCS) + 8 * len(DOCS), (3).to_bytes(8, "little"))  # the last one
    expect(p, ".idx", f"to the sequence count {len(DOCS)}")
    os.remove(p + ".bin")
    expect(p, ".bin", "no such indexed dataset prefix")
    expect(str(tmp_path / "nothing"), ".idx", "no such indexed dataset prefix")

    data = IndexedTokens(good)
    assert data.first_token_at_least(65000) == (4, 65000)
    assert data.first_token_at_least(120) == (2, 120)
    assert data.first_token_at_least(120, chunk=5) == (2, 120)
    assert data.first_token_at_least(65001) is None and data.max_token_id(chunk=4) == 65000


def test_parse_blend_follows_megatron():
    assert parse_blend("corpus_text_document") == (["corpus_text_document"], [1.0])
    assert parse_blend(["a", "b"]) == (["a", "b"], [0.5, 0.5])
    for blend in ([0.3, "a", 0.7, "b"], ["30", "a", "70", "b"], [1, "a ", 3, "b"]):
        prefixes, weights = parse_blend(blend)
        want_p, want_w = get_blend_from_list([str(x) for x in blend])
        assert prefixes == want_p and weights == normalize(want_w)
    assert parse_blend([1, "a", 3, "b"])[1] == [0.25, 0.75]
    errors = {
        (0.3, "a", 0.7): "element 2 (0.7) has no partner",
        (-0.3, "a", 1, "b"): "element 0: weight -0.3",
        (0, "a", 1, "b"): "must be a finite number > 0",
        ("a", 0.5): "element 1 (0.5) is a number where a dataset prefix",
        (0.3, 0.5, 0.7, "b"): "element 1 (0.5) is a number where a dataset prefix",
        (0.3, "a", "b", "c"): "element 2 ('b') is where a weight is expected",
        (): "expected a dataset prefix",
    }
    for blend, message in errors.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_blend(list(blend))
    with pytest.raises(ValueError, match="expected a dataset prefix"):
        parse_blend(None)


def _reference_blend(weights, size):
    """helpers.cpp build_blending_indices, line for line."""
    index, sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
    current = [0] * len(weights)
    for s in range(size):
        x = max(float(s), 1.0)
        best, best_error = 0, weights[0] * x - float(current[0])
        for d in range(1, len(weights)):
            error = weights[d] * x - float(current[d])
            if error > best_error:
                best, best_error = d, error
        index[s], sample[s] = best, current[best]
        current[best] += 1
    return index, sample


def _megatron_blend(weights, size):
    try:
        from megatron.core.datasets import helpers_cpp
    except ImportError:
        return None
    index, sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
    helpers_cpp.build_blending_indices(index, sample, np.asarray(weights, np.float64), len(weights), size, False)
    return index, sample


WEIGHTS = [[0.3, 0.7], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.9999, 0.0001], [2, 1, 1],
           list(np.random.default_rng(0).dirichlet(np.ones(6) * 0.2)),  # down to 1.4e-7: long re-runs
           list(np.random.default_rng(1).dirichlet(np.ones(40)))]


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: f"{len(w)}-datasets")
def test_blend_indices_match_megatron(weights, monkeypatch):
    w = np.asarray(weights, np.float64)
    w = np.asarray(normalize(normalize(w.tolist())))  # what BlendedDataset hands helpers_cpp
    small = 50_000 if len(weights) < 10 else 8_000
    which, sample = blend_indices(w, small)
    ref = _reference_blend(w.tolist(), small)
    assert which.dtype == np.int16 and sample.dtype == np.int64
    assert np.array_equal(which, ref[0]) and np.array_equal(sample, ref[1])
    counts = np.bincount(which, minlength=len(w))
    assert np.all(np.abs(counts - w * small) <= 1)

    reruns = []
    monkeypatch.setattr(ix, "_rerun_one", lambda *a: reruns.append(1) or _RERUN(*a))
    big = 1_000_000 if len(weights) < 10 else 200_000
    cpp = _megatron_blend(w, big)
    if cpp is None:
        pytest.skip("megatron.core.datasets.helpers_cpp is not built here")
    which, sample = blend_indices(w, big)
    assert np.array_equal(which, cpp[0]) and np.array_equal(sample, cpp[1])
    assert np.array_equal(blend_indices(w, 12_345)[0], which[:12_345])  # a prefix of a longer call
    if len(weights) == 6:
        assert reruns, "expected the in-order re-run path to be exercised"


def test_blend_indices_edges():
    assert blend_indices([1.0], 5)[0].tolist() == [0] * 5 and blend_indices([1.0], 5)[1].tolist() == list(range(5))
    assert blend_indices([0.5, 0.5], 0)[0].size == 0
    for bad in ([], [0.5, 0.0], [0.5, -1], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="blend weights"):
            blend_indices(bad, 10)


# -- tools/preprocess_data.py --------------------------------------------------------------------

TEXTS = ["the cat sat on the mat", "a dog ran", "", "the mat was red and the dog was blue",
         "cat dog cat dog", "a red cat", "blue", "the end"] * 6


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tok")
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = ["<pad>", "<unk>", "<s>", "</s>"] + words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(root / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(root / "hf_no_eos")
    sentences = [t for t in TEXTS if t] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(root / "sp"),
                                   vocab_size=60, hard_vocab_limit=False, model_type="word",
                                   minloglevel=2)
    return root


def _jsonl(path, texts, extra=None) -> str:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "title": f"doc {i}", **(extra or {})}) + "\n")
    return str(path)


def test_preprocess_hf_matches_tokenizer(tmp_path, tokenizers, capsys):
    from transformers import AutoTokenizer

    from tools.preprocess_data import main

    src = _jsonl(tmp_path / "in.jsonl", TEXTS)
    hf = str(tokenizers / "hf")
    common = ["--input", src, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf, "--append-eod"]
    assert main(common + ["--output-prefix", str(tmp_path / "w2"), "--workers", "2", "--json-keys", "text", "title",
                          "--log-interval", "10"]) == 0
    out = capsys.readouterr().out
    assert f"{len(TEXTS) - 6} documents" in out and "6 empty documents skipped" in out and "tokens/s" in out
    assert main(common + ["--output-prefix", str(tmp_path / "w1"), "--workers", "1"]) == 0
    tok = AutoTokenizer.from_pretrained(hf)
    ref = IndexedDataset(str(tmp_path / "w2_text_document"), mmap=True)
    kept = [t for t in TEXTS if t]
    assert len(ref) == len(kept) and ref.index.dtype == np.uint16
    for i, text in enumerate(kept):
        assert ref[i].tolist() == tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    titles = IndexedDataset(str(tmp_path / "w2_title_document"), mmap=True)
    assert len(titles) == len(TEXTS) and titles[3].tolist()[-1] == tok.eos_token_id
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1_text_document{ext}").read_bytes() == (tmp_path / f"w2_text_document{ext}").read_bytes()

    assert main(common + ["--output-prefix", str(tmp_path / "sp"), "--tokenizer-hf-include-special-tokens"]) == 0
    assert IndexedTokens(str(tmp_path / "sp_text_document")).document(0).tolist() == tok(kept[0]).input_ids + [3]
    no_eos = common[:-2] + [str(tokenizers / "hf_no_eos"), "--append-eod", "--output-prefix", str(tmp_path / "ne")]
    assert main(no_eos) == 1 and "no end-of-document token" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_preprocess_sentencepiece(tmp_path, tokenizers):
    import sentencepiece as spm

    from tools.preprocess_data import main

    src = _jsonl(tmp_path / "in.jsonl", TEXTS)
    model = str(tokenizers / "sp.model")
    for workers in ("1", "2"):
        assert main(["--input", src, "--output-prefix", str(tmp_path / f"w{workers}"), "--tokenizer-type",
                     "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod", "--workers", workers]) == 0
    sp = spm.SentencePieceProcessor(model_file=model)
    ref = IndexedDataset(str(tmp_path / "w2_text_document"), mmap=True)
    kept = [t for t in TEXTS if t]
    assert len(ref) == len(kept)
    for i, text in enumerate(kept):
        assert ref[i].tolist() == sp.encode(text) + [sp.eos_id()]
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1_text_document{ext}").read_bytes() == (tmp_path / f"w2_text_document{ext}").read_bytes()


@pytest.mark.parametrize("line, message", [
    ('{"text": "a dog", ', "invalid JSON"),
    ('{"title": "a dog"}', "no key 'text'"),
    ('{"text": ["a", "dog"]}', "key 'text' is a JSON list, expected a string"),
    ('["a dog"]', "a JSON list, expected an object"),
])
def test_preprocess_bad_line_writes_nothing(tmp_path, tokenizers, capsys, line, message):
    from tools.preprocess_data import main

    src = tmp_path / "in.jsonl"
    good = json.dumps({"text": "a red cat"})
    src.write_text("\n".join([good] * 300 + [line] + [good] * 5) + "\n")  # the bad line in the second chunk
    out = tmp_path / "out" / "corpus"
    rc = main(["--input", str(src), "--output-prefix", str(out), "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", str(tokenizers / "hf"), "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{src}:301: " in err and message in err, err
    assert not os.listdir(tmp_path / "out")
