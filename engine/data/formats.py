"""The dataset of a run from ``data.format``, ``data.path`` and the recipe (DESIGN §1).

  format       what ``data.path`` holds                          recipes
  auto/alpaca/ conversation records (JSON, JSONL, parquet, an     sft (dpo: preference records)
  sharegpt/    HF ``save_to_disk`` directory), tokenized with
  messages     the chat template
  preference   prompt/chosen/rejected records                    dpo
  megatron     indexed datasets by prefix, or a blend            pretrain
               ``[w1, prefix1, w2, prefix2, ...]`` (Megatron's --data-path)
  tokenized    records with ``input_ids`` and optionally         pretrain, sft
               ``labels`` (-100 = no loss) or ``loss_mask``
               (1 = the token is a target), used as given
  text         records with a ``text`` field, tokenized with     pretrain
               ``data.tokenizer`` plus its end-of-document token
  hf           an HF ``save_to_disk`` directory: its columns     any: input_ids → tokenized,
               decide (input_ids, text, messages/conversations/  text → text, the rest as records
               instruction, prompt/chosen/rejected)

Every problem of the data (a missing prefix, a damaged file, a record of the wrong type, a
token id outside the vocabulary) is a ``DataError`` naming the file and the record; the CLI
builds the dataset before any process group starts.
"""
from __future__ import annotations

from collections.abc import Callable

from engine.data.records import DataError, RecordSource, is_hf_dataset_dir
from engine.data.store import MemoryStore, check_document_ids

RECORD_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "preference")
TOKEN_FORMATS = ("megatron", "tokenized", "text", "hf")


def build_file_dataset(cfg, tokenizer: Callable):
    """The dataset of ``data.source=files``; ``tokenizer()`` loads the run's tokenizer when needed."""
    d = cfg.data
    fmt = d.format
    if fmt == "hf":
        fmt = _hf_kind(d.path, cfg.recipe)
    if fmt == "megatron":
        return _megatron(cfg)
    if fmt in ("tokenized", "text"):
        store = _record_store(cfg, fmt, tokenizer)
        if cfg.recipe == "pretrain":
            from engine.data.pretrain import PretrainSequences

            _check_stream(store)
            return PretrainSequences(store, d.seq_len, cfg.train.seed, d.cross_document_attention)
        from engine.data.sft import TokenizedSFTDataset

        return TokenizedSFTDataset(store, d.seq_len, cfg.train.seed, pack=d.pack)
    if cfg.recipe == "pretrain":
        raise DataError(f"recipe=pretrain reads a token stream; data.format={d.format} holds conversations "
                        f"— use data.format megatron, tokenized, text or hf (with an input_ids or text column)")
    return _record_dataset(cfg, fmt, tokenizer)


def _record_dataset(cfg, fmt: str, tokenizer: Callable):
    from engine.data.sft import PreferenceDataset, SFTDataset

    d = cfg.data
    if d.cache:
        return _cached_record_dataset(cfg, fmt, tokenizer)
    if cfg.recipe == "dpo":  # one pair per sequence: chosen and rejected, each at most half of it
        from engine.recipes.dpo import PairSequences

        fmt = "auto" if fmt in ("auto", "preference") else {"messages": "openai"}.get(fmt, fmt)
        pairs = PreferenceDataset(d.path, tokenizer(), d.seq_len // 2, cfg.train.seed, format=fmt,
                                  skip_bad_records=d.skip_bad_records, overflow=d.overflow)
        return PairSequences(pairs, d.seq_len)
    if fmt == "preference":
        raise DataError("data.format=preference is DPO data; SFT needs alpaca, sharegpt or messages records")
    return SFTDataset(d.path, tokenizer(), d.seq_len, cfg.train.seed, format={"messages": "openai"}.get(fmt, fmt),
                      skip_bad_records=d.skip_bad_records, overflow=d.overflow, pack=d.pack)


def _cached_record_dataset(cfg, fmt: str, tokenizer: Callable):
    """The same dataset as the uncached path, from the data cache (engine/data/cache.py)."""
    from engine.config.hf_model import tokenizer_dir
    from engine.data.cache import encoded_records
    from engine.data.chat import encode_preference, encode_sft
    from engine.data.sft import CachedPreferenceDataset, TokenizedSFTDataset

    d = cfg.data
    if fmt == "preference" and cfg.recipe != "dpo":
        raise DataError("data.format=preference is DPO data; SFT needs alpaca, sharegpt or messages records")
    if cfg.recipe == "dpo":
        cutoff = d.seq_len // 2

        def encode(tok, sample, counts, where):
            return encode_preference(tok, sample["prompt"], sample["chosen"], sample["rejected"], cutoff,
                                     d.overflow, counts, where)

        records = encoded_records(cfg, "preference", tokenizer_dir(cfg), tokenizer, cutoff, encode)
        from engine.recipes.dpo import PairSequences

        return PairSequences(CachedPreferenceDataset(records, cfg.train.seed), d.seq_len)

    def encode(tok, sample, counts, where):
        enc = encode_sft(tok, sample["messages"], d.seq_len, d.overflow, counts, where)
        if enc is None:
            return None
        ids, mask = enc
        return ids, [0] + [int(m) for m in mask[:-1]]  # the target mask: token t+1 where mask[t]

    records = encoded_records(cfg, "sft", tokenizer_dir(cfg), tokenizer, d.seq_len, encode)
    if not records.num_records:
        raise DataError(f"no usable records in {d.path} (stats: {records.stats})")
    ds = TokenizedSFTDataset(records.stores["tokens"], d.seq_len, cfg.train.seed, pack=d.pack, bins_dir=records.path)
    ds.stats = records.stats
    return ds


def _hf_kind(path, recipe: str) -> str:
    """What an HF dataset directory holds, from its columns."""
    from engine.data.records import expand_paths, hf_dataset_table

    dirs = expand_paths(path)
    not_hf = [p for p in dirs if not is_hf_dataset_dir(p)]
    if not_hf:
        raise DataError(f"data.format=hf: {not_hf[0]} is not a directory written by datasets' save_to_disk "
                        f"(no state.json)")
    columns = set(hf_dataset_table(dirs[0]).column_names)
    if "input_ids" in columns:
        return "tokenized"
    if "text" in columns and recipe == "pretrain":
        return "text"
    if columns & {"messages", "conversations", "instruction", "prompt"}:
        return "auto"
    raise DataError(f"{dirs[0]}: columns {sorted(columns)}; expected input_ids, text (pretrain), messages, "
                    f"conversations, instruction, or prompt/chosen/rejected")


def _megatron(cfg):
    from engine.data.blend import parse_blend
    from engine.data.pretrain import BlendedSequences, PretrainSequences
    from engine.data.store import IndexedStore

    d = cfg.data
    if cfg.recipe != "pretrain":
        raise DataError(f"data.format=megatron is a token stream without loss masks; it trains recipe=pretrain "
                        f"(got recipe={cfg.recipe}); give SFT data as tokenized records with labels or loss_mask")
    try:
        prefixes, weights = parse_blend(d.path)
    except ValueError as e:
        raise DataError(f"data.path: {e}") from None
    datasets = []
    for prefix in prefixes:
        store = IndexedStore(prefix)
        store.check_vocab(cfg.model.vocab_size)
        _check_stream(store)
        datasets.append(PretrainSequences(store, d.seq_len, cfg.train.seed + len(datasets),
                                          d.cross_document_attention))
    return datasets[0] if len(datasets) == 1 else BlendedSequences(datasets, weights)


def _record_store(cfg, fmt: str, tokenizer: Callable) -> MemoryStore:
    """Documents of tokenized or text records, checked against the vocabulary; SFT applies
    ``data.overflow`` to documents longer than ``data.seq_len``."""
    d, vocab = cfg.data, cfg.model.vocab_size
    source = RecordSource(d.path, d.skip_bad_records)
    limit = d.seq_len if cfg.recipe != "pretrain" else None
    tok = tokenizer() if fmt == "text" else None
    eod = None
    if tok is not None:
        eod = tok.eos_token_id
        if eod is None:
            raise DataError("data.tokenizer has no eos_token; format=text appends it after every document")
    docs, dropped, truncated = [], 0, 0
    for loc, rec in source.locate():
        where = source.where(loc)
        try:
            ids, targets = (_text_document(rec, tok, eod) if tok is not None else _tokenized_document(rec))
            check_document_ids(ids, vocab, where)
        except DataError as e:
            source.bad(loc, str(e).removeprefix(f"{where}: "))
            continue
        if limit is not None and len(ids) > limit:
            if d.overflow == "error":
                raise DataError(f"{where}: {len(ids)} tokens exceed data.seq_len={limit}; raise seq_len or set "
                                f"data.overflow=truncate or drop")
            if d.overflow == "drop" or (targets is not None and not any(targets[1:limit])):
                dropped += 1
                continue
            ids, targets = ids[:limit], (None if targets is None else targets[:limit])
            truncated += 1
        if targets is not None and limit is not None and not any(targets[1:]):
            source.bad(loc, "no token after the first carries a loss (labels all -100 / loss_mask all 0)")
            continue
        docs.append((ids, targets))
    if not docs:
        raise DataError(f"no usable records in {source.files} (skipped {source.num_skipped}, dropped {dropped})")
    store = MemoryStore(docs, name=", ".join(source.files))
    store.stats = {"records": len(docs), "skipped": source.num_skipped, "truncated": truncated, "dropped": dropped}
    return store


def _check_stream(store) -> None:
    """A pretraining stream needs two tokens (one input, one target): else a DataError naming the
    files, before PretrainSequences' own (ValueError) check."""
    if store.num_tokens < 2:
        raise DataError(f"{store.name}: {store.num_tokens} tokens; a pretraining stream needs at least 2 "
                        f"(add documents)")


def _tokenized_document(rec: dict) -> tuple[list[int], list[bool] | None]:
    ids = rec.get("input_ids")
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise DataError(f"'input_ids': expected a list of integer token ids, got {_describe(ids)}")
    labels, mask = rec.get("labels"), rec.get("loss_mask")
    if labels is not None and mask is not None:
        raise DataError("both 'labels' and 'loss_mask'; give one")
    if labels is not None:
        if not isinstance(labels, (list, tuple)) or len(labels) != len(ids):
            raise DataError(f"'labels': expected a list of {len(ids)} ids aligned with input_ids, got {_describe(labels)}")
        for t, (i, l) in enumerate(zip(ids, labels)):
            if l != -100 and l != i:
                raise DataError(f"'labels'[{t}]={l!r}: expected input_ids[{t}]={i} or -100 (labels are aligned "
                                f"with input_ids; the engine shifts them)")
        return list(ids), [l != -100 for l in labels]
    if mask is not None:
        if (not isinstance(mask, (list, tuple)) or len(mask) != len(ids)
                or not all(m in (0, 1) for m in mask)):
            raise DataError(f"'loss_mask': expected a list of {len(ids)} values 0 or 1 aligned with input_ids, "
                            f"got {_describe(mask)}")
        return list(ids), [bool(m) for m in mask]
    return list(ids), None


def _text_document(rec: dict, tok, eod: int) -> tuple[list[int], None]:
    text = rec.get("text")
    if not isinstance(text, str):
        raise DataError(f"'text': expected a string, got {_describe(text)}")
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    return ids + [eod], None


def _describe(value) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {len(value)} ({', '.join(kinds) or 'empty'})"
    return type(value).__name__


def load_tokenizer_dir(path: str):
    """``AutoTokenizer`` of the directory ``path``; a damaged or incomplete directory (a truncated
    or garbled tokenizer.json, tokenizer_config.json or chat template) is one ``DataError`` naming
    it, whatever transformers or the tokenizers library raised (JSONDecodeError, UnicodeDecodeError,
    an untyped Exception, or pyo3's PanicException for a Rust panic, a BaseException)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise DataError(f"the tokenizer directory {path} cannot be loaded ({type(e).__name__}: {e}); check or "
                        f"replace its tokenizer.json / tokenizer_config.json") from e
