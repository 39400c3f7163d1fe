"""Reading training records from JSON, JSONL and parquet files, and normalising their formats.

Readers stream: a JSONL file is read line by line and a parquet file batch by batch, so memory
holds one record at a time. A JSON file is one document (a list), so it is decoded whole, one
file at a time; use JSONL or parquet for data sets that do not fit in memory. Every record keeps
a ``Location`` (file, offset, 1-based line or row) so a dataset can re-read it later without
holding it, and every error names ``file:line``.

A directory written by Hugging Face ``datasets.Dataset.save_to_disk`` (``state.json`` and Arrow
stream files) is read as one source of rows, memory-mapped with pyarrow (``datasets`` itself is
not needed); a row's location is its index.

Normalised forms:
  conversation (SFT): ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  preference:         ``{"prompt": messages, "chosen": str, "rejected": str}``
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from typing import NamedTuple

EXTENSIONS = (".json", ".jsonl", ".parquet")
FORMATS = ("auto", "alpaca", "sharegpt", "openai")
_WS = re.compile(r"[ \t\n\r]*")
# LLaMA-Factory's default sharegpt tags plus the OpenAI role names.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class DataError(ValueError):
    """A record (or file) that cannot be used; the message names ``file:line`` and what was expected."""


class RecordError(ValueError):
    """A record-level problem without a location yet; readers re-raise it as ``DataError``."""


class Location(NamedTuple):
    file: int     # index into RecordSource.files
    offset: int   # byte offset (JSONL), character offset (JSON) or row index (parquet)
    line: int     # 1-based line (JSON, JSONL) or row (parquet), for messages


def expand_paths(path: str | os.PathLike | list) -> list[str]:
    """``data.path`` as files: a file, a directory (its data files), a glob, or a list of those."""
    if isinstance(path, (list, tuple)):
        return [f for p in path for f in expand_paths(p)]
    path = os.fspath(path)
    if is_hf_dataset_dir(path):
        return [path]
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_dict.json")):
        raise DataError(f"data.path {path!r} is a datasets.DatasetDict; give one split's directory "
                        f"(e.g. {os.path.join(path, 'train')})")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(EXTENSIONS))
    elif glob.has_magic(path):
        files = sorted(glob.glob(path, recursive=True))
    else:
        files = [path]
    if not files:
        raise DataError(f"data.path {path!r} matches no files; give a file, a directory or a glob")
    for f in files:
        if is_hf_dataset_dir(f):
            continue
        if not f.endswith(EXTENSIONS):
            raise DataError(f"{f}: unknown file type; expected one of {', '.join(EXTENSIONS)}")
        if not os.path.isfile(f):
            raise DataError(f"{f}: no such file")
    return files


def is_hf_dataset_dir(path: str) -> bool:
    """A directory written by ``datasets.Dataset.save_to_disk``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json"))


def hf_dataset_table(path: str):
    """The rows of a ``save_to_disk`` directory as one memory-mapped pyarrow Table."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face dataset directory needs pyarrow; pip install pyarrow") from None
    state_file = os.path.join(path, "state.json")
    try:
        with open(state_file, encoding="utf-8") as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state_file}: not a datasets save_to_disk state ({e}); expected "
                        f"{{'_data_files': [{{'filename': ...}}]}}") from None
    tables = []
    for name in files:
        arrow = os.path.join(path, name)
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(arrow)).read_all())
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
            raise DataError(f"{arrow}: cannot read the Arrow stream ({e})") from None
    if not tables:
        raise DataError(f"{state_file}: lists no data files")
    try:
        return pa.concat_tables(tables)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: its Arrow files have different columns ({e})") from None


class RecordSource:
    """Streams raw records (dicts) from files; ``skip_bad_records`` skips and counts broken ones.

    File-level problems (missing file, a JSON file that is not a list or not valid JSON, an
    unreadable parquet file) always raise: there is no record to skip.
    """

    def __init__(self, path, skip_bad_records: bool = False):
        self.files = expand_paths(path)
        self.skip_bad_records = skip_bad_records
        self.num_skipped = 0
        self._json_cache: tuple[int, str] | None = None
        self._hf_cache: tuple[int, object] | None = None

    def __iter__(self) -> Iterator[tuple[str, int, dict]]:
        """``(file, line_or_row, record)`` for every usable record."""
        for loc, rec in self.locate():
            yield self.files[loc.file], loc.line, rec

    def locate(self) -> Iterator[tuple[Location, dict]]:
        for fi, path in enumerate(self.files):
            scan = self._scan_hf if is_hf_dataset_dir(path) else {
                ".json": self._scan_json, ".jsonl": self._scan_jsonl,
                ".parquet": self._scan_parquet}[os.path.splitext(path)[1]]
            for loc, rec in scan(fi, path):
                if isinstance(rec, RecordError) or not isinstance(rec, dict):
                    why = rec if isinstance(rec, RecordError) else (
                        f"expected a JSON object (a record), got {type(rec).__name__}")
                    self.bad(loc, why)
                    continue
                yield loc, rec

    def where(self, loc: Location) -> str:
        return f"{self.files[loc.file]}:{loc.line}"

    def bad(self, loc: Location, why) -> None:
        """Skip and count a bad record, or raise ``DataError`` naming it."""
        if not self.skip_bad_records:
            raise DataError(f"{self.where(loc)}: {why} (set skip_bad_records=True to skip such records)")
        self.num_skipped += 1

    def read(self, locations: list[Location]) -> list[dict]:
        """Re-read records at ``locations`` (in that order), grouping reads by file."""
        out: list = [None] * len(locations)
        by_file: dict[int, list[int]] = {}
        for k, loc in enumerate(locations):
            by_file.setdefault(loc.file, []).append(k)
        for fi, ks in by_file.items():
            path = self.files[fi]
            if is_hf_dataset_dir(path):
                table = self._hf_table(fi, path)
                for k in ks:
                    out[k] = table.slice(locations[k].offset, 1).to_pylist()[0]
            elif path.endswith(".jsonl"):
                with open(path, "rb") as f:
                    for k in ks:
                        f.seek(locations[k].offset)
                        out[k] = json.loads(f.readline().decode("utf-8"))
            elif path.endswith(".json"):
                text = self._json_text(fi, path)
                for k in ks:
                    out[k] = json.JSONDecoder().raw_decode(text, locations[k].offset)[0]
            else:
                pf = _parquet_file(path)
                starts = [0]
                for g in range(pf.metadata.num_row_groups):
                    starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
                groups: dict[int, list[int]] = {}
                for k in ks:
                    g = next(g for g in range(len(starts) - 1) if locations[k].offset < starts[g + 1])
                    groups.setdefault(g, []).append(k)
                for g, gks in groups.items():
                    rows = pf.read_row_group(g).to_pylist()
                    for k in gks:
                        out[k] = rows[locations[k].offset - starts[g]]
        return out

    # --- per-format scanners: yield (Location, record | RecordError) ---

    def _scan_jsonl(self, fi, path):
        offset = 0
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                loc = Location(fi, offset, n)
                offset += len(raw)
                if not raw.strip():
                    continue
                try:
                    yield loc, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield loc, RecordError(f"invalid UTF-8 at byte {e.start} of the line; expected UTF-8 text")
                except json.JSONDecodeError as e:
                    yield loc, RecordError(f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line")

    def _json_text(self, fi, path) -> str:
        if self._json_cache is None or self._json_cache[0] != fi:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw.count(b"\n", 0, e.start) + 1
                raise DataError(f"{path}:{line}: invalid UTF-8; expected UTF-8 text") from None
            self._json_cache = (fi, text)
        return self._json_cache[1]

    def _scan_json(self, fi, path):
        text = self._json_text(fi, path)
        decoder = json.JSONDecoder()
        pos = _WS.match(text, 0).end()
        line = 1 + text.count("\n", 0, pos)

        def fail(msg):
            return DataError(f"{path}:{line}: {msg}")

        if text[pos:pos + 1] != "[":
            raise fail("expected a JSON list of records (use .jsonl for one record per line)")
        new = _WS.match(text, pos + 1).end()
        line, pos = line + text.count("\n", pos, new), new
        if text[pos:pos + 1] == "]":
            return
        while True:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                # Cannot resynchronise inside one JSON document: never skippable.
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a list of JSON objects") from None
            yield Location(fi, pos, line), obj
            new = _WS.match(text, end).end()
            line, pos = line + text.count("\n", pos, new), new
            sep = text[pos:pos + 1]
            if sep == "]":
                return
            if sep != ",":
                raise fail("invalid JSON; expected ',' or ']' after a list element")
            new = _WS.match(text, pos + 1).end()
            line, pos = line + text.count("\n", pos, new), new

    def _hf_table(self, fi, path):
        if self._hf_cache is None or self._hf_cache[0] != fi:
            self._hf_cache = (fi, hf_dataset_table(path))
        return self._hf_cache[1]

    def _scan_hf(self, fi, path):
        row = 0
        for batch in self._hf_table(fi, path).to_batches(max_chunksize=1024):
            for rec in batch.to_pylist():
                yield Location(fi, row, row + 1), rec
                row += 1

    def _scan_parquet(self, fi, path):
        pf = _parquet_file(path)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield Location(fi, row, row + 1), rec
                row += 1


def _parquet_file(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}: cannot read parquet ({e})") from None


# --- format normalisation -------------------------------------------------------------------

def detect_format(rec: dict) -> str:
    if "messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if "prompt" in rec:
        return "prompt"
    raise RecordError(f"unknown format (keys {sorted(rec)}); expected 'messages' (openai), "
                      "'conversations' (sharegpt) or 'instruction' (alpaca)")


def to_conversation(rec: dict, format: str = "auto") -> dict:
    """A raw SFT record as ``{"messages": [...]}``, ending with a non-empty assistant turn."""
    messages = _prompt_messages(rec, format, sft=True)
    _check_turns(messages, last="assistant")
    return {"messages": messages}


def to_preference(rec: dict, format: str = "auto") -> dict:
    """A raw preference record as ``{"prompt": messages, "chosen": str, "rejected": str}``."""
    if "chosen" not in rec or "rejected" not in rec:
        raise RecordError(f"expected 'chosen' and 'rejected' in a preference record (keys {sorted(rec)})")
    prompt = _prompt_messages(rec, format, sft=False)
    _check_turns(prompt, last="user")
    return {"prompt": prompt, "chosen": _response(rec["chosen"], "chosen"),
            "rejected": _response(rec["rejected"], "rejected")}


def _prompt_messages(rec: dict, format: str, sft: bool) -> list[dict]:
    if format not in FORMATS:
        raise DataError(f"format={format!r} is not known; use one of {', '.join(FORMATS)}")
    fmt = detect_format(rec) if format == "auto" else format
    if fmt == "openai":
        return _turns(_field(rec, "messages", list), "role", "content")
    if fmt == "sharegpt":
        msgs = _turns(_field(rec, "conversations", list), "from", "value")
        system = _optional_str(rec, "system")
        return ([{"role": "system", "content": system}] if system else []) + msgs
    if fmt == "alpaca":
        return _alpaca(rec, sft)
    if fmt == "prompt" and not sft:
        p = rec["prompt"]
        return [{"role": "user", "content": p}] if isinstance(p, str) else _turns(_field(rec, "prompt", list), "role", "content")
    if fmt == "prompt":
        raise RecordError("a preference record (prompt/chosen/rejected) in SFT data; expected 'messages', "
                          "'conversations' or 'instruction'")
    raise RecordError(f"expected {fmt} keys; found {sorted(rec)}")


def _alpaca(rec: dict, sft: bool) -> list[dict]:
    msgs = []
    system = _optional_str(rec, "system")
    if system:
        msgs.append({"role": "system", "content": system})
    for k, pair in enumerate(_optional(rec, "history", list) or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"history[{k}]: expected a [query, response] pair of strings")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    # LLaMA-Factory joins instruction and input with a newline.
    query = "\n".join(q for q in (_field(rec, "instruction", str), _optional_str(rec, "input")) if q)
    msgs.append({"role": "user", "content": query})
    if sft:
        msgs.append({"role": "assistant", "content": _field(rec, "output", str)})
    return msgs


def _turns(items: list, role_key: str, content_key: str) -> list[dict]:
    out = []
    for k, m in enumerate(items):
        if not isinstance(m, dict):
            raise RecordError(f"turn {k}: expected an object with '{role_key}' and '{content_key}'")
        # Accept either tag convention in either container (mixed exports are common).
        role = m.get(role_key, m.get("role", m.get("from")))
        content = m.get(content_key, m.get("content", m.get("value")))
        if not isinstance(role, str) or role not in _ROLES:  # a list or object is no role (nor hashable)
            raise RecordError(f"turn {k}: role {role!r} not supported; expected one of {sorted(_ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"turn {k}: expected string content, got {type(content).__name__}")
        out.append({"role": _ROLES[role], "content": content})
    return out


def _check_turns(messages: list[dict], last: str) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError("expected at least one user turn")
    for k, m in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RecordError(f"turn {k + len(messages) - len(body)}: expected a {want} turn "
                              "(system first, then user and assistant alternating)")
        if want == "assistant" and not m["content"].strip():
            raise RecordError(f"turn {k + len(messages) - len(body)}: empty response; expected non-empty assistant content")
    if body[-1]["role"] != last:
        raise RecordError(f"expected the conversation to end with a {last} turn")


def _response(value, name: str) -> str:
    # A string, an assistant message, or a whole conversation ending with the assistant message.
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        value = _turns([value], "role", "content")[0]
        if value["role"] != "assistant":
            raise RecordError(f"'{name}': expected an assistant message, got role {value['role']!r}")
        value = value["content"]
    if not isinstance(value, str):
        raise RecordError(f"'{name}': expected a string or an assistant message")
    if not value.strip():
        raise RecordError(f"'{name}': empty response")
    return value


def _field(rec: dict, key: str, typ: type):
    if key not in rec or rec[key] is None:
        raise RecordError(f"missing '{key}'; expected {typ.__name__}")
    if not isinstance(rec[key], typ):
        raise RecordError(f"'{key}': expected {typ.__name__}, got {type(rec[key]).__name__}")
    return rec[key]


def _optional(rec: dict, key: str, typ: type):
    return None if rec.get(key) is None else _field(rec, key, typ)


def _optional_str(rec: dict, key: str) -> str:
    return _optional(rec, key, str) or ""


def iter_samples(source: RecordSource, kind: str, format: str = "auto") -> Iterator[tuple[Location, dict]]:
    """Normalised samples (``kind`` "sft" or "preference") with their locations; bad ones
    raise or are skipped per ``source.skip_bad_records``."""
    if format not in FORMATS:
        raise DataError(f"format={format!r} is not known; use one of {', '.join(FORMATS)}")
    norm = to_conversation if kind == "sft" else to_preference
    for loc, rec in source.locate():
        try:
            yield loc, norm(rec, format)
        except RecordError as e:
            source.bad(loc, e)
