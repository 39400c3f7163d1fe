"""Record readers, format normalisation, chat-template masking and SFT/preference datasets,
with two tokenizers built locally: a HF fast (WordLevel) one and a sentencepiece one."""
from __future__ import annotations

import json
import random

import pytest
import torch

from engine.data.chat import encode_preference, encode_sft
from engine.data.packing import document_arrays
from engine.data.records import (
    DataError,
    RecordSource,
    iter_samples,
    to_conversation,
    to_preference,
)
from engine.data.sft import PreferenceDataset, SFTDataset, first_fit
from engine.loss import IGNORE_INDEX

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
SPECIALS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _text(rng, lo=1, hi=8):
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    (d / "corpus.txt").write_text("\n".join(_text(rng, 8, 16) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=120,
                                   model_type="bpe", user_defined_symbols=SPECIALS, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=3, minloglevel=2)
    tok = SentencePieceBackend(vocab_file=str(d / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>")
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(params=["hf", "sp"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def _write(path, records):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa
        pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=7)
    return path


def _conversations(n, seed=0, turns=(1, 3)):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(*turns)):
            msgs += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
        out.append({"messages": msgs})
    return out


# --- normalisation --------------------------------------------------------------------------

EXPECTED = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "alpha"},
            {"role": "assistant", "content": "bravo"}, {"role": "user", "content": "charlie\ndelta"},
            {"role": "assistant", "content": "echo"}]
ALPACA = {"instruction": "charlie", "input": "delta", "output": "echo", "system": "be brief",
          "history": [["alpha", "bravo"]]}
SHAREGPT = {"system": "be brief", "conversations": [
    {"from": "human", "value": "alpha"}, {"from": "gpt", "value": "bravo"},
    {"from": "human", "value": "charlie\ndelta"}, {"from": "gpt", "value": "echo"}]}
OPENAI = {"messages": EXPECTED}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_formats_normalise_to_messages(tmp_path, suffix):
    for name, rec in [("alpaca", ALPACA), ("sharegpt", SHAREGPT), ("openai", OPENAI)]:
        path = _write(tmp_path / f"{name}{suffix}", [rec, rec])
        samples = list(iter_samples(RecordSource(path), "sft"))
        assert [loc.line for loc, _ in samples][:1] == [1 if suffix != ".json" else 2]
        assert [s for _, s in samples] == [{"messages": EXPECTED}] * 2, name
        assert to_conversation(rec, name) == {"messages": EXPECTED}
    sharegpt_system_turn = {"conversations": [{"from": "system", "value": "be brief"}] + SHAREGPT["conversations"]}
    assert to_conversation(sharegpt_system_turn)["messages"] == EXPECTED


def test_paths_glob_and_list(tmp_path):
    a = _write(tmp_path / "a.jsonl", [OPENAI])
    b = _write(tmp_path / "b.json", [ALPACA, SHAREGPT])
    assert [(f, n) for f, n, _ in RecordSource(str(tmp_path / "*.json*"))] == [(str(a), 1), (str(b), 2), (str(b), 14)]
    assert len(list(RecordSource([a, str(b)]))) == 3
    with pytest.raises(DataError, match="matches no files"):
        RecordSource(str(tmp_path / "*.csv"))


def test_preference_formats():
    want = {"prompt": [{"role": "user", "content": "alpha"}], "chosen": "bravo", "rejected": "charlie"}
    recs = [{"prompt": "alpha", "chosen": "bravo", "rejected": "charlie"},
            {"messages": [{"role": "user", "content": "alpha"}], "chosen": {"role": "assistant", "content": "bravo"},
             "rejected": {"role": "assistant", "content": "charlie"}},
            {"messages": [{"role": "user", "content": "alpha"}], "chosen": "bravo", "rejected": "charlie"},
            {"conversations": [{"from": "human", "value": "alpha"}], "chosen": {"from": "gpt", "value": "bravo"},
             "rejected": {"from": "gpt", "value": "charlie"}},
            {"instruction": "alpha", "input": "", "chosen": "bravo", "rejected": "charlie"},
            {"prompt": [{"role": "user", "content": "alpha"}],
             "chosen": [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "bravo"}],
             "rejected": [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "charlie"}]}]
    for rec in recs:
        assert to_preference(rec) == want, rec


# --- masking --------------------------------------------------------------------------------

def _spans(mask):
    """Contiguous runs of response tokens, from document_arrays' shifted mask."""
    resp = [False] + list(mask[:-1])
    spans, start = [], None
    for t, r in enumerate(resp + [False]):
        if r and start is None:
            start = t
        if not r and start is not None:
            spans.append((start, t))
            start = None
    return spans


def _clean(tok, ids):
    return " ".join(tok.decode(ids, skip_special_tokens=True).replace("<|end|>", " ").split())


def test_loss_mask_covers_exactly_assistant_tokens(tokenizer):
    for rec in _conversations(20, seed=1):
        ids, mask = encode_sft(tokenizer, rec["messages"], cutoff_len=512)
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        spans = _spans(mask)
        assert [_clean(tokenizer, ids[s:e]) for s, e in spans] == answers
        # The end-of-turn token is learned; nothing else outside the answers is.
        assert all(tokenizer.convert_ids_to_tokens(ids[e - 1]) == "<|end|>" for _, e in spans)
        _, labels, _ = document_arrays(ids, mask)
        targets = [labels[t] for t in range(len(ids)) if labels[t] != IGNORE_INDEX]
        assert torch.equal(torch.stack(targets), torch.tensor([i for s, e in spans for i in ids[s:e]]))


def test_encode_preference(tokenizer):
    prompt = [{"role": "user", "content": "alpha bravo"}]
    p, c, r = encode_preference(tokenizer, prompt, "charlie delta", "echo", cutoff_len=64)
    assert p == tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    assert _clean(tokenizer, c) == "charlie delta" and _clean(tokenizer, r) == "echo"
    p2, c2, r2 = encode_preference(tokenizer, prompt, "charlie delta " * 20, "echo", cutoff_len=24, overflow="truncate")
    assert len(p2) + max(len(c2), len(r2)) <= 24 and p2[-1] == p[-1]
    assert encode_preference(tokenizer, prompt, "charlie delta " * 20, "echo", 24, overflow="drop") is None


# --- datasets -------------------------------------------------------------------------------

def _check_sequence(ds, batch, bin_records):
    assert batch.num_tokens == ds.cutoff_len
    lens = batch.doc_lens
    assert lens[:len(bin_records)] == [ds.lengths[r] for r in bin_records]
    assert sum(lens) == ds.cutoff_len and len(lens) - len(bin_records) in (0, 1)
    encs = ds.load(bin_records)
    for (s, e), (ids, mask) in zip(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()), encs):
        ref_tokens, ref_labels, _ = document_arrays(ids, mask)
        assert torch.equal(batch.tokens[s:e], ref_tokens) and torch.equal(batch.labels[s:e], ref_labels)
        assert torch.equal(batch.position_ids[s:e], torch.arange(e - s))
        assert batch.labels[e - 1] == IGNORE_INDEX  # no label crosses a document boundary (I-2)
    if len(lens) > len(bin_records):
        assert (batch.labels[sum(lens[:-1]):] == IGNORE_INDEX).all()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_sft_dataset_packs_every_record_once(tmp_path, hf_tokenizer, suffix):
    path = _write(tmp_path / f"d{suffix}", _conversations(60, seed=2))
    ds = SFTDataset(path, hf_tokenizer, cutoff_len=96, seed=3)
    assert ds.stats == {"records": 60, "skipped": 0, "truncated": 0, "dropped": 0}
    S = ds.sequences_per_epoch
    for epoch in range(2):
        bins = ds.bins(epoch)
        assert len(bins) == S and sorted(r for b in bins for r in b) == list(range(60))
        assert all(sum(ds.lengths[r] for r in b) <= 96 for b in bins)
        for k in range(0, S, 3):
            _check_sequence(ds, ds.sequence(epoch * S + k), bins[k])
    assert ds.bins(0) != ds.bins(1)


def test_sft_dataset_deterministic_per_seed(tmp_path, sp_tokenizer):
    path = _write(tmp_path / "d.jsonl", _conversations(40, seed=4))
    a, b = (SFTDataset(path, sp_tokenizer, 128, seed=7) for _ in range(2))
    S = a.sequences_per_epoch
    for i in [0, 1, S - 1, S, 2 * S + 1]:
        x, y = a.sequence(i), b.sequence(i)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.cu_seqlens, y.cu_seqlens)
    c = SFTDataset(path, sp_tokenizer, 128, seed=8)
    assert c.sequences_per_epoch == S and c.bins(0) != a.bins(0)


def test_first_fit():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    bins = first_fit(lengths, 64)
    loads = [sum(lengths[p] for p in b) for b in bins]
    assert sorted(p for b in bins for p in b) == list(range(300)) and max(loads) <= 64
    for b, bin_ in enumerate(bins):  # first fit: no earlier bin had room when an item was placed
        for p in bin_:
            before = [sum(lengths[q] for q in bins[c] if q < p) for c in range(b)]
            assert all(load + lengths[p] > 64 for load in before)


def test_preference_dataset(tmp_path, tokenizer):
    rng = random.Random(5)
    recs = [{"prompt": _text(rng), "chosen": f"{WORDS[i]} {_text(rng)}", "rejected": _text(rng)} for i in range(12)]
    ds = PreferenceDataset(_write(tmp_path / "p.jsonl", recs), tokenizer, cutoff_len=64, seed=1)
    assert ds.pairs_per_epoch == 12
    seen = []
    for i in range(12):
        (_, cl), (_, rlab) = ds.pair(i)
        chosen = _clean(tokenizer, cl[cl != IGNORE_INDEX].tolist())
        rejected = _clean(tokenizer, rlab[rlab != IGNORE_INDEX].tolist())
        rec = next(r for r in recs if r["chosen"] == chosen)
        assert rejected == rec["rejected"]
        seen.append(recs.index(rec))
    assert sorted(seen) == list(range(12)) and seen != list(range(12))
    assert [ds.order(1)] != [ds.order(0)]


# --- bad records and overflow ---------------------------------------------------------------

def test_bad_records_name_file_and_line(tmp_path, hf_tokenizer):
    good = json.dumps(OPENAI).encode()
    bad_lines = {
        2: b'{"messages": [',                                            # invalid JSON
        3: b'{"instruction": "\xff\xfe"}',                               # invalid UTF-8
        5: json.dumps({"instruction": 5, "output": "x"}).encode(),       # wrong type
        6: json.dumps({"instruction": "a", "output": "  "}).encode(),    # empty response
        7: json.dumps({"question": "a", "answer": "b"}).encode(),        # unknown format
        8: b"[1, 2]",                                                    # not an object
        9: json.dumps({"conversations": [{"from": "gpt", "value": "a"}]}).encode(),  # wrong turn order
    }
    lines = [bad_lines.get(n, good) for n in range(1, 11)]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expect = {2: "invalid JSON", 3: "invalid UTF-8", 5: "'instruction': expected str", 6: "empty response",
              7: "unknown format", 8: "expected a JSON object", 9: "expected a user turn"}
    for n, what in expect.items():
        only = tmp_path / f"bad{n}.jsonl"
        only.write_bytes(b"\n".join([good] * (n - 1) + [lines[n - 1]]) + b"\n")
        with pytest.raises(DataError) as e:
            SFTDataset(only, hf_tokenizer, 64, seed=0)
        assert f"{only}:{n}: " in str(e.value) and what in str(e.value), str(e.value)
    ds = SFTDataset(path, hf_tokenizer, 64, seed=0, skip_bad_records=True)
    assert ds.stats["skipped"] == 7 and ds.stats["records"] == 3

    js = tmp_path / "bad.json"
    js.write_text(json.dumps([OPENAI, {"instruction": "a", "output": ""}], indent=2))
    with pytest.raises(DataError, match=f"{js}:26: .*empty response"):
        SFTDataset(js, hf_tokenizer, 64, seed=0)
    pq = _write(tmp_path / "bad.parquet", [ALPACA] * 9 + [dict(ALPACA, output="")])
    with pytest.raises(DataError, match=f"{pq}:10: .*empty response"):
        SFTDataset(pq, hf_tokenizer, 64, seed=0)
    assert SFTDataset(pq, hf_tokenizer, 64, seed=0, skip_bad_records=True).stats["skipped"] == 1


def test_overflow_modes(tmp_path, hf_tokenizer):
    recs = _conversations(10, seed=6, turns=(1, 1))
    recs[4] = {"messages": [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "bravo " * 80}]}
    path = _write(tmp_path / "o.jsonl", recs)
    with pytest.raises(DataError, match=f"{path}:5: .*exceed cutoff_len=48"):
        SFTDataset(path, hf_tokenizer, 48, seed=0)
    ds = SFTDataset(path, hf_tokenizer, 48, seed=0, overflow="truncate")
    assert ds.stats == {"records": 10, "skipped": 0, "truncated": 1, "dropped": 0} and max(ds.lengths) == 48
    for i in range(ds.sequences_per_epoch):
        assert ds.sequence(i).num_tokens == 48
    ds = SFTDataset(path, hf_tokenizer, 48, seed=0, overflow="drop")
    assert ds.stats == {"records": 9, "skipped": 0, "truncated": 0, "dropped": 1}
    with pytest.raises(ValueError, match="overflow='cut'"):
        SFTDataset(path, hf_tokenizer, 48, seed=0, overflow="cut")


def test_mask_with_template_that_injects_a_default_system_turn(hf_tokenizer):
    import copy
    tok = copy.deepcopy(hf_tokenizer)
    tok.chat_template = ("{% if messages[0].role != 'system' %}<|system|>\nalpha bravo<|end|>\n{% endif %}"
                         "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    msgs = _conversations(1, seed=9, turns=(3, 3))[0]["messages"]
    msgs = [m for m in msgs if m["role"] != "system"]
    ids, mask = encode_sft(tok, msgs, cutoff_len=512)
    assert [_clean(tok, ids[s:e]) for s, e in _spans(mask)] == [m["content"] for m in msgs if m["role"] == "assistant"]
