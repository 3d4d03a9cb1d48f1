"""Pack slot streams into fixed-length rows with document ids.

A row of length ``L`` holds several documents back to back; attention stays inside a document
(block-causal by ``doc_ids``) and every document's positions restart at 0, so a document packed
beside others is computed exactly as it would be alone. The batch format is pinned in
``docs/ARCHITECTURE.md``.

Packing fills each row exactly from a pool of waiting documents (subset-sum over their lengths,
oldest document first): see :class:`RowPacker`. ``bench/data.py`` measures its efficiency.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from omnifuse.tokenizers.stream import Stream

IGNORE = -100
PAD_DOC = -1


@dataclass
class Doc:
    """One tokenized sample on its way into a row."""

    stream: Stream
    task: int  # index into omnifuse.data.world.TASKS
    key: str = ""
    shard: str = ""


def labels_of(stream: Stream) -> torch.Tensor:
    """(S,) next-slot labels: slot i predicts slot i+1's token when that slot is a target."""
    labels = torch.full_like(stream.tokens, IGNORE)
    labels[:-1] = torch.where(stream.target[1:], stream.tokens[1:], IGNORE)
    return labels


def build_row(docs: list[Doc], row_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Lay ``docs`` out in one row of ``row_len`` slots; the tail is padding with doc id -1."""
    used = sum(len(d.stream) for d in docs)
    if used > row_len:
        raise ValueError(f"{used} slots do not fit a row of {row_len}")
    tokens = torch.full((row_len,), pad_id, dtype=torch.long)
    modality = torch.zeros(row_len, dtype=torch.long)
    positions = torch.zeros(row_len, 3, dtype=torch.long)
    doc_ids = torch.full((row_len,), PAD_DOC, dtype=torch.long)
    labels = torch.full((row_len,), IGNORE, dtype=torch.long)
    label_task = torch.full((row_len,), -1, dtype=torch.long)
    start = 0
    for i, doc in enumerate(docs):
        s, end = doc.stream, start + len(doc.stream)
        tokens[start:end] = s.tokens
        modality[start:end] = s.modality
        positions[start:end] = s.positions
        doc_ids[start:end] = i
        doc_labels = labels_of(s)
        labels[start:end] = doc_labels
        label_task[start:end] = torch.where(doc_labels != IGNORE, doc.task, -1)
        start = end
    return {
        "tokens": tokens,
        "modality": modality,
        "positions": positions,
        "doc_ids": doc_ids,
        "labels": labels,
        "label_task": label_task,
        # Patches of all docs, in slot order, since docs are laid out in order.
        "image_patches": _cat([d.stream.image_patches for d in docs]),
        "audio_patches": _cat([d.stream.audio_patches for d in docs]),
    }


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=0)


class RowPacker:
    """Streams documents in, rows out.

    Documents wait in a pool of ``pool`` (in arrival order). When it is full, a row is emitted:
    the oldest waiting document always goes in (so no document waits for more than a few rows),
    and the rest of the row is the subset of the pool with the largest total length that fits,
    found exactly by subset-sum dynamic programming (bitsets as Python ints: ``pool × row_len``
    bit operations per row). ``efficiency`` is the share of emitted slots that hold data.
    """

    def __init__(self, row_len: int, pool: int = 64, pad_id: int = 0):
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.row_len, self.pool, self.pad_id = row_len, pool, pad_id
        self.rows_emitted = 0
        self.slots_used = 0

    @property
    def efficiency(self) -> float:
        return self.slots_used / max(1, self.rows_emitted * self.row_len)

    def __call__(self, docs: Iterable[Doc]) -> Iterator[dict[str, torch.Tensor]]:
        waiting: list[Doc] = []
        for doc in docs:
            n = len(doc.stream)
            if n > self.row_len:
                raise ValueError(f"sample {doc.key!r} has {n} slots, longer than a row of {self.row_len}")
            waiting.append(doc)
            if len(waiting) >= self.pool:
                yield self._emit(waiting)
        while waiting:
            yield self._emit(waiting)

    def _emit(self, waiting: list[Doc]) -> dict[str, torch.Tensor]:
        first = waiting.pop(0)
        cap = self.row_len - len(first.stream)
        lengths = [len(d.stream) for d in waiting]
        mask = (1 << (cap + 1)) - 1
        reach = [1]  # reach[k]: bit s set <=> some subset of waiting[:k] sums to s
        for n in lengths:
            reach.append((reach[-1] | (reach[-1] << n)) & mask)
        s = reach[-1].bit_length() - 1  # the largest total that fits
        chosen = []
        for k in range(len(lengths) - 1, -1, -1):
            if not (reach[k] >> s) & 1:  # s needs document k
                chosen.append(k)
                s -= lengths[k]
        row = [first] + [waiting[k] for k in reversed(chosen)]
        for k in chosen:  # descending, so indices stay valid
            del waiting[k]
        self.rows_emitted += 1
        self.slots_used += sum(len(d.stream) for d in row)
        return build_row(row, self.row_len, self.pad_id)


def collate_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch; patches concatenate in row order, i.e. row-major slot order."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if not k.endswith("_patches")}
    for k in ("image_patches", "audio_patches"):
        batch[k] = torch.cat([r[k] for r in rows], dim=0)
    return batch
