"""Two-process DDP job for tests/test_train.py: rank 1's second batch is NaN, rank 0's are finite.

    python tests/ddp_nonfinite_job.py OUT_DIR

Lightning's DDP launcher re-runs this script for rank 1. Each rank writes OUT_DIR/rank{r}.json:
which steps changed the weights, the non-finite count, a checksum of the weights; the final
state goes to OUT_DIR/final.ckpt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import IterableDataset

from test_train import nan_batches, tiny_module


class RankBatches(IterableDataset):
    """Three batches per rank; rank 1's batch 1 holds a NaN patch."""

    def __iter__(self):
        return nan_batches(3, {1} if torch.distributed.get_rank() == 1 else set())


class WeightWatch(L.Callback):
    def __init__(self) -> None:
        self.changed: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters())))


def main(out: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module()
    watch = WeightWatch()
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out), callbacks=[watch])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(RankBatches(), batch_size=None))
    trainer.save_checkpoint(out / "final.ckpt")
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps({
        "changed": watch.changed,
        "nonfinite_total": module.nonfinite_total,
        "global_step": module.global_step,
        "checksum": [float(p.double().sum()) for p in module.parameters()],
        "train_flops": module.flops_seen,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
