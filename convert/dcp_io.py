"""PyTorch distributed checkpoint (DCP) plumbing for chunk lists rather than state dicts (I-8).

Saving: :class:`ChunkSavePlanner` hands DCP a prepared list of write items (rectangles of global
tensors, see convert/layout.py) whose data is resolved lazily, and :class:`StreamingWriter` writes
them one at a time in plan order, dropping each once written, so a rank never holds more than the
item in flight. Every rank plans only its own items; DCP merges the plans into one ``.metadata``.

Reading: :class:`DistCheckpoint` opens a checkpoint directory once (metadata read and every shard
file checked) and serves :class:`~convert.layout.Request`s: rectangles of global tensors read
straight into the caller's tensors, whatever chunks the writer used. The reader loads one stored
chunk at a time, so a rank holds its own tensors plus one stored chunk.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.futures import Future
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from convert.files import CheckpointError
from convert.layout import Request

# dcp's single-process mode warns on every call that it assumes a single process: we mean that.
NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def chunk_item(key: str, offsets, sizes, dtype: torch.dtype | TensorProperties, global_shape) -> WriteItem:
    """The DCP write item of the rectangle (``offsets``, ``sizes``) of global tensor ``key``.
    Built from shapes alone (never from tensor data: the simulator passes fake tensors).
    ``dtype`` may be a ``TensorProperties`` the items of one key share (the metadata keeps the
    first item's: setting its dtype later, before DCP finishes, sets the key's)."""
    props = dtype if isinstance(dtype, TensorProperties) else TensorProperties(dtype=dtype)
    return WriteItem(index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                                            sizes=torch.Size(sizes)),
                                                 properties=props, size=torch.Size(global_shape)))


def bytes_item(key: str) -> WriteItem:
    return WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)


class ChunkSavePlanner(DefaultSavePlanner):
    """A DCP save planner for prepared write items. ``data`` maps ``(key, offsets)`` (offsets
    None for BYTE_IO items) to the item's tensor or object, or to a zero-argument function
    returning it (called when the writer gets to the item); each entry is dropped once handed
    over, so memory shrinks as the files grow. ``on_resolve(item)`` is called after each."""

    def __init__(self, items: list[WriteItem], data: dict, on_resolve: Callable | None = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items, self._data, self._on_resolve = items, data, on_resolve

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        offsets = write_item.index.offset
        obj = self._data.pop((write_item.index.fqn, None if offsets is None else tuple(offsets)))
        if callable(obj):
            obj = obj()
        if self._on_resolve is not None:
            self._on_resolve(write_item, obj)
        return self.transform_object(write_item, obj)  # torch.save's non-tensor objects into bytes


class StreamingWriter(FileSystemWriter):
    """DCP's file writer (same files, metadata and ``__<rank>_0.distcp`` name), writing this rank's
    items one at a time, in plan order, each dropped once written.

    ``FileSystemWriter`` keeps every tensor it wrote to a file until the file is closed (the
    ``tensor_dict`` of ``_write_files_from_queue``, torch/distributed/checkpoint/filesystem.py),
    i.e. a copy of everything a rank saves, and it resolves items in size order when CUDA is
    available (``_OverlappingCpuLoader``) or several threads write — a converter resolving data
    from a stream in model order would then buffer the whole model. Here each item is resolved,
    copied to the host if needed (a view of a larger storage is cloned, as DCP does), appended
    with ``torch.save`` and released; the file is fsync'd at the end."""

    def __init__(self, path: str):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, per_thread_copy_ahead=0)

    def write_data(self, plan: SavePlan, planner) -> Future:
        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
        from torch.distributed.checkpoint.storage import WriteResult

        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with open(os.path.join(self.path, name), "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    t = data.detach().cpu()
                    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                        t = t.clone()  # only the view's bytes, not its storage's
                    torch.save(t, stream)
                del data
                results.append(WriteResult(index=item.index, size_in_bytes=stream.tell() - offset,
                                           storage_data=_StorageInfo(name, offset, stream.tell() - offset)))
            stream.flush()
            os.fsync(stream.fileno())
        fut: Future = Future()
        fut.set_result(results)
        return fut


# ---------------------------------------------------------------------------------------------
# Reading


class _RequestPlanner(LoadPlanner):
    """Read items for a list of requests; ``resolve_tensor`` hands out views of their ``dest``."""

    def __init__(self, requests: list[Request]):
        self.by_key: dict[str, list[Request]] = {}
        for r in requests:
            self.by_key.setdefault(r.key, []).append(r)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, reqs in self.by_key.items():
            chunks = [ChunkStorageMetadata(torch.Size(r.offsets), torch.Size(r.sizes)) for r in reqs]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("byte objects are not requested")

    def resolve_tensor(self, read_item):
        dest = self.by_key[read_item.dest_index.fqn][read_item.dest_index.index].dest
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # the reader copied into the view of dest


class StreamingReader(FileSystemReader):
    """DCP's file reader, one read item at a time: ``FileSystemReader.read_data`` keeps the stored
    chunk it loaded last alive while it loads the next (two whole stored chunks at a time); here
    each item's chunk is released before the next is loaded."""

    def read_data(self, plan: LoadPlan, planner) -> Future:
        for item in plan.items:
            super().read_data(LoadPlan([item]), planner).wait()
        fut: Future = Future()
        fut.set_result(None)
        return fut


class DistCheckpoint:
    """A torch_dist checkpoint directory opened for reading: its DCP metadata, read once, and
    every shard file it names checked to exist with the bytes it should."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise FileNotFoundError(f"{path} is not a torch_dist checkpoint: {os.path.join(path, '.metadata')} "
                                    f"is missing")
        self.reader = StreamingReader(path)
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - unpickling a damaged file fails in many ways
            raise CheckpointError(f"{os.path.join(path, '.metadata')} is damaged ({type(e).__name__}: {e})") from e
        check_metadata(path, self.metadata)
        self.files = check_files(path, self.metadata)
        try:
            self.reader.set_up_storage_reader(self.metadata, True)
        except Exception as e:  # noqa: BLE001 - a valid pickle of the wrong shape fails in many ways
            raise CheckpointError(f"{os.path.join(path, '.metadata')} is damaged ({type(e).__name__}: {e})") from e

    def tensor_keys(self) -> list[str]:
        return [k for k, md in self.metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)]

    def has(self, key: str) -> bool:
        return isinstance(self.metadata.state_dict_metadata.get(key), TensorStorageMetadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._md(key).properties.dtype

    def _md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{self.path} has no tensor {key!r}; it was saved by another model or "
                                  f"without this state")
        return md

    def read(self, requests: list[Request]) -> None:
        """Fill every request's ``dest`` from the checkpoint (any chunking on either side)."""
        for r in requests:
            md = self._md(r.key)
            if len(r.offsets) != len(md.size) or any(o + s > n for o, s, n in zip(r.offsets, r.sizes, md.size)):
                raise CheckpointError(f"{self.path}: {r.key} is {tuple(md.size)}; the run asks for "
                                      f"{tuple(r.sizes)} at {tuple(r.offsets)} (another model?)")
        planner = _RequestPlanner(requests)
        planner.set_up_planner({}, self.metadata)
        try:
            self.reader.read_data(planner.create_local_plan(), planner).wait()
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            keys = sorted(planner.by_key)
            where = sorted({f for k in keys for f in self.files.get(k, [])})
            raise CheckpointError(f"{self.path}: cannot read {keys[:3]} from {', '.join(where[:4])} "
                                  f"({type(e).__name__}: {e}): the file is damaged") from e

    def read_whole(self, key: str, index: tuple = ()) -> torch.Tensor:
        """The whole global tensor ``key`` (or its sub-tensor at leading ``index``, e.g. one layer
        of a stacked key) as a new tensor in the stored dtype."""
        shape = self.shape(key)
        sizes = (1,) * len(index) + shape[len(index):]
        out = torch.empty(sizes, dtype=self.dtype(key))
        self.read([Request(key, tuple(index) + (0,) * (len(shape) - len(index)), sizes, out)])
        return out.reshape(shape[len(index):])


def _is_index(x) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in x)


def _tiles(chunks, shape: tuple) -> bool:
    """The chunks cover ``shape`` exactly once: their volumes add up and no two overlap (a sweep
    along dim 0, so a grid of n chunks costs about n comparisons per chunk row)."""
    volume = 1
    for g in shape:
        volume *= g
    if sum(math.prod(c.sizes) for c in chunks) != volume:
        return False
    boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks)
    for i, (oi, si) in enumerate(boxes):
        for oj, sj in boxes[i + 1:]:
            if oi and oj[0] >= oi[0] + si[0]:
                break
            overlap = all(a < b + m and b < a + n for a, n, b, m in zip(oi, si, oj, sj))
            if overlap and math.prod(si) and math.prod(sj):
                return False
    return True


def _metadata_fault(metadata) -> str | None:
    """What makes an unpickled ``.metadata`` unusable, or None. A flipped byte can leave a valid
    pickle of the wrong shape (an attribute renamed, a number turned into a string), which DCP
    would only trip over midway through a read."""
    sdm, storage = getattr(metadata, "state_dict_metadata", None), getattr(metadata, "storage_data", None)
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        return "state_dict_metadata and storage_data must be dicts"
    for key, md in sdm.items():
        if not isinstance(key, str):
            return f"key {key!r} is not a string"
        if isinstance(md, BytesStorageMetadata):
            continue
        if not isinstance(md, TensorStorageMetadata):
            return f"{key}: {type(md).__name__} is neither tensor nor bytes metadata"
        size, chunks = getattr(md, "size", None), getattr(md, "chunks", None)
        if not _is_index(size) or not isinstance(getattr(getattr(md, "properties", None), "dtype", None),
                                                 torch.dtype):
            return f"{key}: its size or dtype is malformed"
        if not isinstance(chunks, list) or not chunks:
            return f"{key}: it lists no chunks"
        for c in chunks:
            offs, sizes = getattr(c, "offsets", None), getattr(c, "sizes", None)
            if not (isinstance(c, ChunkStorageMetadata) and _is_index(offs) and _is_index(sizes)
                    and len(offs) == len(sizes) == len(size)
                    and all(o + n <= g for o, n, g in zip(offs, sizes, size))):
                return f"{key}: a chunk {offs}+{sizes} does not lie inside its shape {tuple(size)}"
        if not _tiles(chunks, tuple(size)):
            return f"{key}: its chunks do not tile its shape {tuple(size)} exactly once"
    for index, info in storage.items():
        fqn, rel = getattr(index, "fqn", None), getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(index, MetadataIndex) or fqn not in sdm:
            return f"storage entry for {fqn!r} names no key of the checkpoint"
        if (not isinstance(rel, str) or not rel or os.path.basename(rel) != rel or rel.startswith(".")
                or not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0):
            return f"{fqn}: its storage entry (file, offset, length) is malformed"
    return None


def check_metadata(path: str, metadata) -> None:
    """One CheckpointError naming ``.metadata`` when its contents are not a DCP checkpoint's."""
    fault = _metadata_fault(metadata)
    if fault:
        raise CheckpointError(f"{os.path.join(path, '.metadata')} is damaged: {fault}")


def check_files(path: str, metadata) -> dict[str, list[str]]:
    """Every shard file the metadata points at exists and holds the bytes it should; returns the
    files of each key (for messages). A missing or truncated file is named in the error."""
    files: dict[str, list[str]] = {}
    need: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        where = os.path.join(path, info.relative_path)
        need[where] = max(need.get(where, 0), info.offset + info.length)
        files.setdefault(index.fqn, [])
        if where not in files[index.fqn]:
            files[index.fqn].append(where)
    for where, size in sorted(need.items()):
        if not os.path.isfile(where):
            raise CheckpointError(f"{where} is missing: the checkpoint {path} is incomplete (its .metadata lists it)")
        have = os.path.getsize(where)
        if have < size:
            raise CheckpointError(f"{where} is truncated: {have} bytes, the checkpoint's .metadata needs {size}")
    return files


def byte_keys(metadata) -> list[str]:
    return [k for k, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]


def quiet_no_dist():
    """A context silencing DCP's single-process warning."""
    ctx = warnings.catch_warnings()

    class _Ctx:
        def __enter__(self):
            ctx.__enter__()
            warnings.filterwarnings("ignore", message=NO_DIST_WARNING)

        def __exit__(self, *exc):
            return ctx.__exit__(*exc)

    return _Ctx()


def dcp_save(planner, writer, *, no_dist: bool) -> None:
    """``dcp.save`` of a chunk planner's items (over the default process group unless ``no_dist``).
    DCP wraps any failure of any rank into a ``CheckpointException`` (a BaseException); the first
    rank's own exception is re-raised instead, so a user error keeps its type and message."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with quiet_no_dist():
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=no_dist)
    except CheckpointException as e:
        failures = e.failures
        if failures:
            exc = failures[min(failures)][0]
            if isinstance(exc, Exception):
                raise exc from e
        raise
