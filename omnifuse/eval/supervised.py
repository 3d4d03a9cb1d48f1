"""The supervised reference of the contrastive suite: the same encoder, trained with labels.

CLIP's paper sets zero-shot accuracy beside a linear probe and a fully supervised model of the
same data (Radford et al. 2021, §3.1.5 and §3.2). The contrastive suite has the first two; this is
the third. It answers the question a low zero-shot number raises: is the class learnable *at all*
by this encoder from the media this world has, or is the contrastive objective not asking for it?

    python -m omnifuse.eval.supervised --ckpt runs/clip --task shape digit word --steps 600

For each task it trains a fresh :class:`~omnifuse.model.encoders.PatchEncoder` of the run's size
(random init, the run's seed) and a linear head with cross-entropy on the run's world's ``train``
media labelled for that task (:func:`omnifuse.eval.contrastive.media_labels`: one-object scenes for
colour / shape / size, one-digit images for digit, signs for word, one-event clips for kind /
pitch), and scores it on the ``test`` media. Training and test media are exactly the items the
contrastive suite reads (:func:`omnifuse.eval.contrastive.read_items`), so the three numbers share
their test set. Writes ``supervised.json`` (accuracy with a 95% Wilson interval, n, the training
accuracy and the curve per task; the media left out, counted by reason) into ``--out`` (default
``RUN/eval``).

``--arch cnn`` trains a small convolutional network (:class:`ConvReference`) on the same media
instead of the run's ViT. A ViT has no built-in translation equivariance and must learn it from the
data (Dosovitskiy et al. 2021, §4.3: it trails CNNs of its size on small data sets); a CNN has it
by construction. The two references side by side separate "this world has too few examples of the
class" (both fail) from "this encoder cannot learn it from this many" (only the CNN succeeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from omnifuse.eval.contrastive import stack_items, wilson_interval
from omnifuse.model.encoders import EncoderConfig, PatchEncoder, unpatchify

TASKS = ("color", "shape", "size", "digit", "word", "kind", "pitch")
ARCHS = ("vit", "cnn")


class ConvReference(nn.Module):
    """A four-layer CNN over the item's pixels with a global max pool: the translation-equivariant
    reference of ``--arch cnn``. 3x3 convolutions (strides 1, 2, 2, 2; widths ``width``/4, /2, 1, 1)
    with GELU; the max runs over the cells that hold a real patch only. ``embed`` takes what
    :meth:`PatchEncoder.embed` takes and returns ``(M, width)``."""

    def __init__(self, channels: int, patch: int, width: int):
        super().__init__()
        self.patch = patch
        widths = [channels, max(width // 4, 1), max(width // 2, 1), width, width]
        layers: list[nn.Module] = []
        for i, stride in enumerate((1, 2, 2, 2)):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride, 1), nn.GELU()]
        self.net = nn.Sequential(*layers)

    def embed(self, patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pixels = unpatchify(patches, grid, mask, self.patch)  # (M, C, H, W)
        real = mask.unsqueeze(-1).expand(*mask.shape, self.patch * self.patch).float()  # one channel of ones
        covered = unpatchify(real, grid, mask, self.patch)  # (M, 1, H, W): 1 where a real patch lies
        h = self.net(pixels)  # (M, width, h, w)
        keep = F.adaptive_max_pool2d(covered, h.shape[-2:]) > 0  # (M, 1, h, w): cells over a real patch
        return h.masked_fill(~keep, float("-inf")).amax(dim=(-2, -1))  # (M, width)


def _accuracy(encoder: nn.Module, head: nn.Linear, x: tuple, y: torch.Tensor, batch: int = 512) -> float:
    was = encoder.training
    encoder.eval()
    with torch.no_grad():
        correct = sum(int((head(encoder.embed(*(t[i:i + batch] for t in x))).argmax(-1) == y[i:i + batch]).sum())
                      for i in range(0, len(y), batch))
    encoder.train(was)
    return correct / max(len(y), 1)


def train_supervised(cfg: EncoderConfig, train: Sequence, test: Sequence, task: str, steps: int = 600,
                     batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
                     eval_every: int = 100, progress: bool = False, arch: str = "vit") -> dict:
    """A fresh encoder of size ``cfg`` plus a linear head, trained with cross-entropy on the items of
    ``train`` labelled for ``task`` (AdamW, batches drawn with replacement), scored on those of ``test``.
    ``arch="cnn"``: a :class:`ConvReference` of width ``cfg.dim`` over the pixels (laid out by
    ``cfg.channels`` and ``cfg.patch``) instead of the ViT.
    Returns ``{"accuracy", "ci95", "n", "n_train", "train_accuracy", "classes", "steps", "curve"}``
    (``curve``: ``[step, test accuracy]`` every ``eval_every`` steps), or ``{}`` with fewer than two
    training classes or no test item. A test item of a class absent from training counts as wrong."""
    fit = [it for it in train if task in it.labels]
    held = [it for it in test if task in it.labels]
    classes = sorted({it.labels[task] for it in fit})
    if len(classes) < 2 or not held:
        return {}
    index = {c: i for i, c in enumerate(classes)}
    x, y = stack_items(fit), torch.tensor([index[it.labels[task]] for it in fit])
    x_test, y_test = stack_items(held), torch.tensor([index.get(it.labels[task], -1) for it in held])
    torch.manual_seed(seed)
    if arch == "cnn":
        if cfg.channels * cfg.patch**2 != cfg.patch_dim:
            raise ValueError(f"arch='cnn' lays the patches out as pixels: patch_dim {cfg.patch_dim} must be channels "
                             f"({cfg.channels}) x P x P for a patch side P (EncoderConfig.channels)")
        encoder = ConvReference(cfg.channels, cfg.patch, cfg.dim)
        head = nn.Linear(cfg.dim, len(classes))
    elif arch == "vit":
        encoder = PatchEncoder(cfg)
        head = nn.Linear(cfg.embed_dim or cfg.dim, len(classes))
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
    draw = torch.Generator().manual_seed(seed)
    curve = []
    for step in tqdm(range(steps), desc=f"supervised {task}", disable=not progress, leave=False, dynamic_ncols=True):
        if step % eval_every == 0:
            curve.append([step, _accuracy(encoder, head, x_test, y_test)])
        rows = torch.randint(len(y), (batch_size,), generator=draw)
        loss = F.cross_entropy(head(encoder.embed(*(t[rows] for t in x))), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    acc = _accuracy(encoder, head, x_test, y_test)
    curve.append([steps, acc])
    correct = round(acc * len(held))
    return {"accuracy": acc, "ci95": list(wilson_interval(correct, len(held))), "n": len(held), "n_train": len(fit),
            "arch": arch,
            "train_accuracy": _accuracy(encoder, head, x, y), "classes": classes, "steps": steps, "curve": curve}


def main(argv: Sequence[str] | None = None) -> dict:
    from omnifuse.eval.contrastive import read_items
    from omnifuse.eval.loading import load_run
    from omnifuse.model.encoders import ContrastiveModel

    parser = argparse.ArgumentParser(
        prog="python -m omnifuse.eval.supervised",
        description="The supervised reference of a CLIP/CLAP stage run: its encoder architecture trained from scratch "
                    "with labels on the world's train media, per zero-shot task, scored on the test media the "
                    "contrastive suite uses. Says whether a class is learnable by the encoder from this world at all.")
    parser.add_argument("--ckpt", required=True,
                        help="a CLIP/CLAP stage run directory (its encoder size, seed and world)")
    parser.add_argument("--task", nargs="+", choices=TASKS, help="zero-shot tasks (default: every task of the medium)")
    parser.add_argument("--steps", type=int, default=600, help="training steps per task (default: 600)")
    parser.add_argument("--batch-size", type=int, default=128, help="media per step (default: 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--arch", choices=ARCHS, default="vit",
                        help="vit: the run's encoder architecture (default); cnn: a small CNN of the encoder's width "
                             "over the same pixels, the translation-equivariant reference (module docstring)")
    parser.add_argument("--world", metavar="DIR", help="read the media from this world instead of the run's")
    parser.add_argument("--train-limit", type=int, help="at most N train samples read (default: the whole split)")
    parser.add_argument("--out", help="folder for supervised.json (default: RUN/eval)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    run = load_run(args.ckpt)
    if not isinstance(run.model, ContrastiveModel):
        parser.error(f"{args.ckpt} is a {run.fusion} run, not a CLIP/CLAP stage (configs/stage/clip.yaml or clap.yaml)")
    cfg, kind = run.model.cfg.encoder_config(), run.model.cfg.modality
    tasks = args.task or ([t for t in TASKS if t not in ("kind", "pitch")] if kind == "image" else ["kind", "pitch"])
    world = Path(args.world) if args.world else run.world_dir
    data = run.config.get("data") or {}
    seed = int(run.config.get("seed_everything") or 0)
    unscored: dict = defaultdict(list)
    read = dict(kind=kind, image_size=data.get("image_size"), progress=not args.quiet, unscored=unscored)
    train, _ = read_items(world, "train", run.interleaver, limit=args.train_limit, **read)
    test, _ = read_items(world, "test", run.interleaver, **read)
    results = {"run": str(args.ckpt), "world": str(world), "arch": args.arch, "encoder": dataclasses.asdict(cfg),
               "seed": seed,
               "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "unscored": {f"{split}: {reason}": len(ids) for (split, reason), ids in sorted(unscored.items())},
               "tasks": {}}
    for task in tasks:
        t0 = time.perf_counter()
        r = train_supervised(cfg, train, test, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=seed, progress=not args.quiet, arch=args.arch)
        if not r:
            print(f"{task}: not run (fewer than two classes among the train media, or no test media)")
            continue
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results["tasks"][task] = r
        lo, hi = r["ci95"]
        print(f"{task:>6}: supervised test accuracy {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {r['n']} media "
              f"(trained on {r['n_train']}, train accuracy {r['train_accuracy']:.3f}; "
              f"chance {1 / len(r['classes']):.3f})", flush=True)
    out = Path(args.out) if args.out else Path(args.ckpt) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    name = "supervised.json" if args.arch == "vit" else f"supervised-{args.arch}.json"
    (out / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / name}")
    return results


if __name__ == "__main__":
    main()
