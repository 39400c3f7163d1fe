#!/usr/bin/env python3
"""Generate the tiny SFT / DPO assets meshtron ships in configs/data/tiny: a word-level Hugging Face
tokenizer with a chat template, and key-value retrieval conversations (SFT) and preference pairs
(DPO) in JSONL. Deterministic for a seed.

    python tools/make_tiny_data.py [--out configs/data/tiny] [--records 400] [--pairs 200]

Each conversation lists key=value facts and asks for one key's value; the answer is the value
(the rejected answer of a preference pair is another key's value). Retrieval over long contexts
is what long-sequence post-training is for, and a tiny model learns it visibly.
"""
from __future__ import annotations

import argparse
import json
import os
import random

NUM_KEYS = 100
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ["facts", ":", "what", "is", "the", "value", "of", "?", "=", ";", "answer", "with", "one", "word", "."]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def build_tokenizer(out: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIAL + WORDS + [f"k{i}" for i in range(NUM_KEYS)] + [f"v{i}" for i in range(NUM_KEYS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    return fast


def conversation(rng: random.Random, num_facts: int):
    keys = rng.sample(range(NUM_KEYS), num_facts)
    values = {k: rng.randrange(NUM_KEYS) for k in keys}
    facts = " ; ".join(f"k{k} = v{values[k]}" for k in keys)
    asked = rng.choice(keys)
    other = rng.choice([k for k in keys if values[k] != values[asked]] or [asked])
    prompt = f"facts : {facts} . what is the value of k{asked} ?"
    return prompt, f"v{values[asked]}", f"v{values[other]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="configs/data/tiny")
    ap.add_argument("--records", type=int, default=400, help="SFT conversations")
    ap.add_argument("--pairs", type=int, default=200, help="preference pairs")
    ap.add_argument("--max-facts", type=int, default=24, help="facts per conversation (context length)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    build_tokenizer(os.path.join(args.out, "tokenizer"))
    rng = random.Random(args.seed)
    with open(os.path.join(args.out, "sft.jsonl"), "w") as f:
        for _ in range(args.records):
            prompt, answer, _ = conversation(rng, rng.randint(2, args.max_facts))
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    with open(os.path.join(args.out, "dpo.jsonl"), "w") as f:
        for _ in range(args.pairs):
            prompt, chosen, rejected = conversation(rng, rng.randint(2, args.max_facts))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    print(f"wrote tokenizer, {args.records} SFT records and {args.pairs} preference pairs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
