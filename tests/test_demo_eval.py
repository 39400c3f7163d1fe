"""tools/demo.py's evaluation: the exact-match accuracy of greedy answers scores a perfect stub
model 100 %, wrong ones (a letter off, no end-of-sequence token, the copy) 0 %, a model right on
even lengths exactly that share, through left-padded batches of mixed prompt lengths; the
held-out examples are reversals, distinct, and share no prompt with the SFT or DPO data."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "demo.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("demo", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StubModel:
    """``generate`` reads each prompt's letters back from its (left-padded) ids and writes
    ``reply(letters)``'s tokens, then the end-of-sequence token unless ``stop`` is false."""

    def __init__(self, tokenizer, reply, stop: bool = True):
        self.tokenizer, self.reply, self.stop = tokenizer, reply, stop

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id, pad_token_id):
        assert not do_sample
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            assert all(m == 0 for m in mask[:mask.index(1)]) and all(mask[mask.index(1):])  # left padding
            text = self.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            letters = text.split(":", 1)[1].split("<|")[0].split()  # "<|user|> reverse : a b <|assistant|>"
            new = self.tokenizer(self.reply(letters), add_special_tokens=False)["input_ids"]
            rows.append((new + [eos_token_id] * self.stop)[:max_new_tokens])
        width = max(map(len, rows))
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    demo = load_tool()
    out = tmp_path_factory.mktemp("demo")
    args = argparse.Namespace(seed=3, records=400, eval_examples=120)
    tok_dir, examples = demo.make_data(str(out), args)
    from transformers import AutoTokenizer

    return demo, out, AutoTokenizer.from_pretrained(tok_dir), examples


def test_held_out_examples_are_reversals_absent_from_the_training_data(demo_data):
    _, out, _, examples = demo_data
    sft = [json.loads(line)["messages"] for line in (out / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(line) for line in (out / "dpo.jsonl").read_text().splitlines()]
    train_prompts = {m[0]["content"] for m in sft} | {r["prompt"] for r in dpo}
    assert len(sft) == 400 and len(examples) == 120
    assert len({p for p, _ in examples}) == len(examples)
    assert not train_prompts & {p for p, _ in examples}
    for prompt, answer in examples + [(m[0]["content"], m[1]["content"]) for m in sft]:
        letters = prompt.removeprefix("reverse : ").split()
        assert 3 <= len(letters) <= 6 and answer.split() == letters[::-1]
    assert all(r["chosen"].split() == r["prompt"].split()[:1:-1] != r["rejected"].split() for r in dpo)


def test_accuracy_is_exact_match_of_the_greedy_answer(demo_data):
    demo, _, tok, examples = demo_data
    assert len({len(a.split()) for _, a in examples}) > 1  # mixed prompt lengths: real left padding

    def score(reply, stop=True):
        return demo.accuracy(StubModel(tok, reply, stop), tok, examples, batch_size=32)

    assert score(lambda letters: " ".join(letters[::-1])) == 1.0
    assert score(lambda letters: " ".join(letters[::-1]), stop=False) == 0.0
    assert score(lambda letters: " ".join(["a" if letters[-1] != "a" else "b"] + letters[-2::-1])) == 0.0
    assert score(lambda letters: " ".join(letters[::-1] + ["a"])) == 0.0
    copy_right = sum(a == p.removeprefix("reverse : ") for p, a in examples) / len(examples)
    assert score(lambda letters: " ".join(letters)) == copy_right  # right on palindromes only
    even = sum(len(a.split()) % 2 == 0 for _, a in examples) / len(examples)
    assert score(lambda letters: " ".join(letters[::-1] if len(letters) % 2 == 0 else letters[:1])) == even


def test_chance_is_guessing_each_letter():
    demo = load_tool()
    assert demo.chance([("reverse : a b c", "c b a")]) == pytest.approx(26.0 ** -3)
    assert demo.chance([("", "a b c"), ("", "a b c d")]) == pytest.approx((26.0 ** -3 + 26.0 ** -4) / 2)
