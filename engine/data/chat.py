"""Tokenising conversations with the tokenizer's own chat template.

Where the assistant's tokens lie is found by rendering prefixes of the conversation: the turn k
response spans from the end of ``render(messages[:k], add_generation_prompt=True)`` to the end of
``render(messages[:k+1])``. Each end is taken as the longest common prefix with the full render,
so the token ids trained on are always those of the whole conversation, even where a template or
a tokenizer merges tokens across a turn boundary (the straddling token then counts as prompt).
Anything the template writes after the content of an assistant turn (end-of-turn token, EOS) is
part of the response, so the model learns to stop.

``loss_mask`` follows ``packing.document_arrays``: ``loss_mask[t]`` says whether predicting
``tokens[t+1]`` counts, i.e. it is True exactly where the *next* token is an assistant token.
"""
from __future__ import annotations

from collections import Counter

from engine.data.records import DataError, RecordError

OVERFLOW = ("error", "truncate", "drop")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in some versions
        ids = ids["input_ids"]
    return list(ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def loss_mask_from_response(is_response: list[bool]) -> list[bool]:
    """Per-token "is a response token" flags -> ``document_arrays``' shifted loss mask."""
    return list(is_response[1:]) + [False]


def encode_sft(tokenizer, messages: list[dict], cutoff_len: int, overflow: str = "error",
               counts: Counter | None = None, where: str = "sample"):
    """``(token_ids, loss_mask)`` of one conversation, or None when dropped.

    A conversation longer than ``cutoff_len`` raises (``overflow="error"``), is cut to its first
    ``cutoff_len`` tokens (``"truncate"``; dropped when no response token survives), or is
    dropped (``"drop"``); ``counts["truncated"]``/``counts["dropped"]`` are incremented.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r} is not known; use one of {', '.join(OVERFLOW)}")
    ids = render(tokenizer, messages)
    is_response = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(ids, render(tokenizer, messages[:k], add_generation_prompt=True))
        end = _common_prefix(ids, render(tokenizer, messages[:k + 1]))
        is_response[start:end] = [True] * max(0, end - start)
    if len(ids) > cutoff_len:
        if overflow == "error":
            raise DataError(f"{where}: {len(ids)} tokens exceed cutoff_len={cutoff_len}; raise cutoff_len "
                            "or set overflow='truncate' or 'drop'")
        if overflow == "truncate" and any(is_response[1:cutoff_len]):
            ids, is_response = ids[:cutoff_len], is_response[:cutoff_len]
            _count(counts, "truncated")
        else:
            _count(counts, "dropped")
            return None
    if not any(is_response[1:]):
        raise RecordError("no assistant token found in the rendered conversation; "
                          "the chat template drops or rewrites the assistant turns")
    return ids, loss_mask_from_response(is_response)


def encode_preference(tokenizer, prompt_messages: list[dict], chosen: str, rejected: str, cutoff_len: int,
                      overflow: str = "error", counts: Counter | None = None, where: str = "sample"):
    """``(prompt_ids, chosen_ids, rejected_ids)`` with ``prompt_ids + chosen_ids`` the render of the
    prompt plus the chosen turn (same for rejected); None when dropped.

    Over ``cutoff_len`` (prompt plus the longer response) with ``overflow="truncate"``: the
    responses keep ``max(cutoff_len - len(prompt), cutoff_len // 2)`` tokens from their start and
    the prompt keeps its *last* tokens (the turn being answered) to fill the rest.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r} is not known; use one of {', '.join(OVERFLOW)}")
    full_c = render(tokenizer, prompt_messages + [{"role": "assistant", "content": chosen}])
    full_r = render(tokenizer, prompt_messages + [{"role": "assistant", "content": rejected}])
    prompt = render(tokenizer, prompt_messages, add_generation_prompt=True)
    p = min(_common_prefix(prompt, full_c), _common_prefix(prompt, full_r), _common_prefix(full_c, full_r))
    prompt_ids, chosen_ids, rejected_ids = full_c[:p], full_c[p:], full_r[p:]
    longest = p + max(len(chosen_ids), len(rejected_ids))
    if longest > cutoff_len:
        if overflow == "error":
            raise DataError(f"{where}: {longest} tokens exceed cutoff_len={cutoff_len}; raise cutoff_len "
                            "or set overflow='truncate' or 'drop'")
        if overflow == "drop" or cutoff_len < 2:
            _count(counts, "dropped")
            return None
        budget = max(cutoff_len - p, cutoff_len // 2)
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        keep = cutoff_len - max(len(chosen_ids), len(rejected_ids))
        prompt_ids = prompt_ids[len(prompt_ids) - keep:] if keep > 0 else []
        _count(counts, "truncated")
    if not chosen_ids or not rejected_ids or not prompt_ids:
        raise RecordError("empty prompt or response after tokenisation (are chosen and rejected equal?)")
    return prompt_ids, chosen_ids, rejected_ids


def _count(counts: Counter | None, key: str) -> None:
    if counts is not None:
        counts[key] += 1
