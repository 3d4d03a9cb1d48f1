"""Training-step benchmark: native multimodal step vs text-only step of the same decoder.

    python bench/train.py [--scale tiny] [--steps 10] [--device cpu|cuda] [--compile] [--json out.json]

Both steps run the same decoder on batches of the same shape ``(B, L)``: the native batch comes
from the world's packed training rows (text, image and audio slots), the text-only batch has
every slot a text token (same doc-id layout). The ratio native/text is the cost of fusion beyond
the decoder (patch embeddings, modality embedding). Timings interleave the two arms step by step
so machine noise hits both alike; the median step is reported. Peak memory: CUDA allocator peak
on GPU, process peak RSS on CPU. MFU counts the native step's FLOPs as training does
(``NativeLM.step_flops``: attention causal within the batch's documents, patch projections on
media slots; ``omnifuse/training/compute.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnifuse.data.datamodule import WorldDataModule  # noqa: E402
from omnifuse.model.config import DecoderConfig, NativeConfig  # noqa: E402
from omnifuse.tokenizers.stream import TEXT  # noqa: E402
from omnifuse.training.compute import device_peak_flops  # noqa: E402
from omnifuse.training.module import NativeLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def scale_config(scale: str) -> tuple[dict, dict]:
    cfg = yaml.safe_load((ROOT / "configs" / "scale" / f"{scale}.yaml").read_text())
    return cfg["model"]["init_args"]["model"]["decoder"], cfg["data"]


def text_only(batch: dict, vocab: int) -> dict:
    b = dict(batch)
    g = torch.Generator().manual_seed(0)
    b["tokens"] = torch.randint(9, vocab, batch["tokens"].shape, generator=g)
    b["modality"] = torch.full_like(batch["modality"], TEXT)
    b["image_patches"] = batch["image_patches"][:0]
    b["audio_patches"] = batch["audio_patches"][:0]
    return b


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--batch-size", type=int, help="override the preset's rows per batch")
    p.add_argument("--world", help="world folder (default: the preset's)")
    p.add_argument("--json", help="also write the row as JSON here")
    args = p.parse_args(argv)

    dec, data = scale_config(args.scale)
    dm = WorldDataModule(world_dir=args.world or data["world_dir"], preset=data.get("preset", args.scale),
                         vocab_size=data["vocab_size"], row_len=data["row_len"],
                         batch_size=args.batch_size or data["batch_size"], num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    native_batch = next(iter(dm.train_dataloader()))
    cfg = NativeConfig(DecoderConfig(vocab_size=data["vocab_size"], max_seq_len=data["row_len"], **dec))
    dev = torch.device(args.device)
    module = NativeLM(cfg)
    model = module.model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if args.compile else model
    batches = {"native": native_batch, "text": text_only(native_batch, data["vocab_size"])}
    batches = {k: {n: t.to(dev) for n, t in b.items()} for k, b in batches.items()}

    def step(b: dict) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = fwd(b["tokens"], b["modality"], b["positions"], b["image_patches"], b["audio_patches"],
                         doc_ids=b["doc_ids"])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for b in batches.values():  # warm-up (and compilation)
        step(b)
        step(b)
    times = {k: [] for k in batches}
    for _ in range(args.steps):
        for k, b in batches.items():
            sync()
            t0 = time.perf_counter()
            step(b)
            sync()
            times[k].append(time.perf_counter() - t0)
    slots = native_batch["tokens"].numel()
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = float(module.step_flops(batches["native"]))
    peak = device_peak_flops(dev)
    row = {
        "scale": args.scale,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "params": model.num_params(),
        "batch": list(native_batch["tokens"].shape),
        "native_step_s": med["native"],
        "text_step_s": med["text"],
        "native_over_text": med["native"] / med["text"],
        "native_tokens_per_s": slots / med["native"],
        "text_tokens_per_s": slots / med["text"],
        "mfu": flops / med["native"] / peak if peak else None,
        "peak_memory_mb": (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "compile": args.compile,
        "bf16": args.bf16,
    }
    cols = ["scale", "device", "params", "native_tokens_per_s", "text_tokens_per_s", "native_over_text", "mfu", "peak_memory_mb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
