"""Tokenized shards kept on disk between runs (``data.token_cache``).

Reading, decoding and tokenizing a sample costs ~410 µs on one CPU core (``bench/data.py
--cache-passes``, docs/PERFORMANCE.md), and gives the same documents every time
the same shard is read with the same settings. Within one run the loader's document cache replays
them after the first pass (:mod:`omnifuse.data.stream`); this cache keeps them across runs, so the
study's dozens of runs over one world, a resumed run and every arm after the first start with the
tokenized documents instead of the tars.

Layout: ``ROOT/<fingerprint>/<shard id>.pt`` with ``ROOT/<fingerprint>/fingerprint.json`` saying what
the fingerprint covers. The fingerprint hashes everything a document depends on: the tokenizer
model's bytes, the data settings that change a document (medium format, patch, image size,
positions, media mode, pixel shuffle, tasks kept, hard negatives and their seed and vocabulary) and
the source of ``omnifuse/data`` and ``omnifuse/tokenizers`` (a code change writes a new cache rather
than replaying an old one). A shard id hashes the shard's resolved path, size and modification
time, so a rewritten shard is read again. Deleting ``ROOT`` is always safe.

A file holds one shard read whole: its documents, the task-filter counts, and the bad-sample
policy's events in order (sample decoded, sample bad with its shard, key, field and reason, document
yielded), so replaying it counts and raises exactly as reading the tar did. Documents are stored as a
few concatenated tensors per field (slices come back as views) and string fields as one joined string
each, loaded with ``weights_only=True`` (nothing in a cache file runs code) and ``mmap=True`` (the
tensors are mapped from the file, copy-on-write, not read into memory: a shard's load is a short pause
even on a short step, and writing into a loaded tensor never reaches the file). Files are written
atomically (temporary file, then rename), so an interrupted run or two runs writing the same shard
leave either no file or a whole one, and a file being replaced stays whole for a reader mapping it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch

from omnifuse.data.samples import BadSample

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: string columns and events joined into one string each; loaded memory-mapped
PACKAGE = Path(__file__).resolve().parents[1]  # omnifuse/
SOURCE_DIRS = ("data", "tokenizers")

# policy events of a shard read (see TokenCache): one per decoded sample, bad sample and document
OK, DOC = "o", "d"


def source_hash() -> str:
    """SHA-256 of the data path's source files (``omnifuse/data``, ``omnifuse/tokenizers``)."""
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for path in sorted((PACKAGE / d).glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TokenCache:
    """One data configuration's tokenized shards under ``root``.

    Args:
        root: cache folder (created on the first write).
        settings: JSON-able description of everything besides the code that a document depends on;
            the fingerprint hashes it with :func:`source_hash`.
    """

    def __init__(self, root: str | Path, settings: dict):
        self.settings = {"format_version": FORMAT_VERSION, **settings, "source_sha256": source_hash()}
        blob = json.dumps(self.settings, sort_keys=True).encode()
        self.fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        self.dir = Path(root) / self.fingerprint
        self.writable = True  # set False after a failed write: the run goes on without writing
        self.hits = self.writes = 0

    def path(self, shard: str) -> Path:
        p = Path(shard).resolve()
        st = p.stat()
        key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return self.dir / f"{p.stem}-{key}.pt"

    def load(self, shard: str) -> tuple[list, list, Counter] | None:
        """``(docs, events, filtered)`` of ``shard``, or None when it is not cached (or unreadable)."""
        try:
            path = self.path(shard)
        except OSError:
            return None
        if not path.exists():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            docs = unpack_docs(blob["docs"])
            events = [e if isinstance(e, str) else BadSample(*e) for e in unpack_values(blob["events"])]
            filtered = Counter(blob["filtered"])
        except Exception as e:  # a damaged or foreign file is read again from the tar, never trusted
            log.warning("token cache: cannot read %s (%s: %s); reading %s from the tar instead",
                        path, type(e).__name__, e, shard)
            return None
        self.hits += 1
        return docs, events, filtered

    def save(self, shard: str, docs: list, events: list, filtered: Counter) -> None:
        """Write one shard read whole, atomically; a failed write turns writing off for the run."""
        if not self.writable:
            return
        try:
            path = self.path(shard)
            self.dir.mkdir(parents=True, exist_ok=True)
            info = self.dir / "fingerprint.json"
            if not info.exists():
                _atomic_write(info, lambda f: f.write(json.dumps(self.settings, indent=1, sort_keys=True).encode()))
            if not self.writes:
                log.info("token cache: keeping the tokenized shards read whole in %s for later runs (about the size "
                         "of the float patches: ~200 MiB for the tiny world's train split; delete the folder any "
                         "time, --data.token_cache null turns it off)", self.dir)
            blob = {
                "docs": pack_docs(docs),
                "events": pack_values([e if isinstance(e, str) else [e.shard, e.key, e.field, e.reason, e.kind]
                                       for e in events]),
                "filtered": dict(filtered),
            }
            _atomic_write(path, lambda f: torch.save(blob, f))
        except (OSError, RuntimeError) as e:
            self.writable = False
            log.warning("token cache: cannot write under %s (%s: %s); this run reads the tars without saving "
                        "them (data.token_cache)", self.dir, type(e).__name__, e)
            return
        self.writes += 1


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from the world's other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- (un)packing documents
#
# A shard's documents are dataclass records (a packed stream's Doc holding a Stream; a pair stream's
# list of Pair per sample). Saving thousands of small tensors one by one is slow to load, so every
# tensor field is concatenated over the records along dim 0 with its lengths (None kept as absent),
# a field of strings (or None) becomes one joined string (the weights-only unpickler is Python and
# handles one object at a time: a string per document and field made a shard's load slow), and any
# other field stays a list.

SEPARATOR = "\x00"


def pack_values(values: list):
    """A list -> ``{"joined": str, "none": bool tensor}`` when every value is a string without
    :data:`SEPARATOR` or None, else ``{"values": values}`` unchanged."""
    if all(v is None or (isinstance(v, str) and SEPARATOR not in v) for v in values):
        return {"joined": SEPARATOR.join(v or "" for v in values), "n": len(values),
                "none": torch.tensor([v is None for v in values], dtype=torch.bool)}
    return {"values": list(values)}


def unpack_values(packed) -> list:
    """The inverse of :func:`pack_values`."""
    if "values" in packed:
        return list(packed["values"])
    strings = packed["joined"].split(SEPARATOR) if packed["n"] else []
    if len(strings) != packed["n"]:
        raise ValueError(f"{len(strings)} joined strings for {packed['n']} values")
    return [None if none else v for v, none in zip(strings, packed["none"].tolist())]

def _record_classes() -> dict[str, type]:
    from omnifuse.data.packing import Doc
    from omnifuse.data.pairs import Pair
    from omnifuse.tokenizers.stream import Stream

    return {c.__name__: c for c in (Doc, Pair, Stream)}


def _fields(obj, prefix: str, out: dict) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f"{prefix}{f.name}/"] = type(value).__name__
            _fields(value, f"{prefix}{f.name}.", out)
        else:
            out[prefix + f.name] = value


def pack_docs(docs: list) -> dict:
    """A shard's documents -> a dict of a few tensors and lists (see the comment above)."""
    classes = _record_classes()
    shape = []  # per document: -1 = one record, n >= 0 = a list of n records
    records = []
    for doc in docs:
        if isinstance(doc, list):
            shape.append(len(doc))
            records.extend(doc)
        else:
            shape.append(-1)
            records.append(doc)
    flat = []
    for r in records:
        if type(r).__name__ not in classes:
            raise TypeError(f"token cache: cannot store a {type(r).__name__} record")
        row = {"/": type(r).__name__}
        _fields(r, "", row)
        flat.append(row)
    columns: dict[str, dict] = {}
    for key in (flat[0] if flat else {}):
        values = [row[key] for row in flat]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if tensors and all(v is None or isinstance(v, torch.Tensor) for v in values):
            trailing, dtype = tensors[0].shape[1:], tensors[0].dtype
            if tensors[0].dim() == 0 or any(t.shape[1:] != trailing or t.dtype != dtype for t in tensors):
                raise TypeError(f"token cache: field {key} holds tensors of different trailing shapes or dtypes")
            width = trailing.numel()
            columns[key] = {
                "data": torch.cat([t.reshape(t.shape[0], width) for t in tensors]),
                "lengths": torch.tensor([t.shape[0] for t in tensors], dtype=torch.long),
                "trailing": list(trailing),
                "present": torch.tensor([v is not None for v in values], dtype=torch.bool),
            }
        else:
            if any(isinstance(v, torch.Tensor) for v in values):
                raise TypeError(f"token cache: field {key} mixes tensors and other values")
            columns[key] = pack_values(values)
    return {"shape": shape, "columns": columns, "records": len(records)}


def unpack_docs(blob: dict) -> list:
    """The inverse of :func:`pack_docs`: the same documents, tensors as views of the stored ones."""
    classes = _record_classes()
    n = blob["records"]
    rows: list[dict] = [{} for _ in range(n)]
    for key, col in blob["columns"].items():
        if "data" not in col:
            values = unpack_values(col)
            if len(values) != n:
                raise ValueError(f"field {key}: {len(values)} values for {n} records")
            for row, v in zip(rows, values):
                row[key] = v
            continue
        pieces = iter(torch.split(col["data"], col["lengths"].tolist()))
        trailing = col["trailing"]
        for row, present in zip(rows, col["present"].tolist()):
            row[key] = next(pieces).reshape(-1, *trailing) if present else None
    records = [_build(row, "", classes, row["/"]) for row in rows]
    docs, i = [], 0
    for k in blob["shape"]:
        if k < 0:
            docs.append(records[i])
            i += 1
        else:
            docs.append(records[i : i + k])
            i += k
    if i != n:
        raise ValueError(f"document shape covers {i} records of {n}")
    return docs


def _build(row: dict, prefix: str, classes: dict[str, type], name: str):
    cls = classes.get(name)
    if cls is None:
        raise ValueError(f"unknown record class {name!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = row.get(f"{prefix}{f.name}/")
        kwargs[f.name] = _build(row, f"{prefix}{f.name}.", classes, sub) if sub else row[prefix + f.name]
    return cls(**kwargs)
