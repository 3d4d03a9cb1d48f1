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

``--llava`` adds the LLaVA arm at the same slots: the same decoder on the same packed rows (1-D
positions), the media slots filled by the frozen encoders (the preset's ``encoder:`` size, random
weights: timing does not depend on them) through the projectors. Interleaved with the native step:
a stage-1 step (projectors train, the frozen LM is back-propagated through), a stage-2 step
(projectors and LM train), and the frozen encoders' forward alone (both modalities, no autograd),
which is where a LLaVA step's extra time goes. MFU of the stage-2 step counts
``LLaVALM.step_flops`` (frozen forwards included).
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
from omnifuse.model.encoders import EncoderConfig  # noqa: E402
from omnifuse.model.llava import LLaVAConfig  # noqa: E402
from omnifuse.model.media import group_patches, media_layout  # noqa: E402
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT  # noqa: E402
from omnifuse.training.compute import device_peak_flops  # noqa: E402
from omnifuse.training.llava import LLaVALM  # noqa: E402
from omnifuse.training.module import NativeLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def scale_config(scale: str) -> tuple[dict, dict]:
    cfg = yaml.safe_load((ROOT / "configs" / "scale" / f"{scale}.yaml").read_text())
    return cfg["model"]["init_args"]["model"]["decoder"], cfg["data"]


def scale_encoder(scale: str) -> dict:
    """The preset's media-encoder size (its top-level ``encoder:`` block)."""
    return yaml.safe_load((ROOT / "configs" / "scale" / f"{scale}.yaml").read_text())["encoder"]


def llava_module(dec: dict, data: dict, encoder: dict, train_lm: bool) -> LLaVALM:
    """A LLaVA module at the preset's decoder and encoder sizes, random weights (no stage run read)."""
    patch = data.get("patch", 8)
    enc = {k: encoder[k] for k in ("dim", "n_layers", "n_heads", "ffn_hidden")}
    cfg = LLaVAConfig(
        DecoderConfig(vocab_size=data["vocab_size"], max_seq_len=data["row_len"], positions="1d", **dec),
        image_encoder=EncoderConfig(patch_dim=3 * patch * patch, **enc),
        audio_encoder=EncoderConfig(patch_dim=patch * patch, **enc),
        patch=patch,
    )
    return LLaVALM(cfg, train_lm=train_lm)


def encoders_forward(model, b: dict) -> None:
    """The frozen encoders' part of a LLaVA step: group each modality's patches per item and run
    the encoder up to ``feature_layer`` without autograd (``LLaVAFusion.media_features`` less the projector)."""
    with torch.no_grad():
        for kind, encoder, key in ((IMAGE, model.image_encoder, "image_patches"),
                                   (AUDIO, model.audio_encoder, "audio_patches")):
            layout = media_layout(b["tokens"], b["modality"], kind)
            if layout.n_items:
                grouped, grid, mask = group_patches(b[key], layout)  # (M, n, d), (M, n, 2), (M, n)
                encoder.patch_features(grouped, grid, mask, layer=model.cfg.feature_layer)


def interleaved_medians(steps: dict, n: int, sync) -> dict[str, float]:
    """Median seconds of each zero-argument callable of ``steps``, run in turn ``n`` times (two
    warm-up rounds first), so that machine noise hits all of them alike."""
    for _ in range(2):
        for fn in steps.values():
            fn()
    times = {k: [] for k in steps}
    for _ in range(n):
        for k, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


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
    p.add_argument("--llava", action="store_true", help="also time the LLaVA arm's steps at the same slots")
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
    if args.llava:
        row["llava"] = llava_rows(args, dec, data, native_batch, module, dev, sync)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


def llava_rows(args, dec: dict, data: dict, native_batch: dict, native: NativeLM, dev, sync) -> dict:
    """LLaVA steps next to the native step on the same rows (module docstring); prints a table."""
    dm = WorldDataModule(world_dir=args.world or data["world_dir"], preset=data.get("preset", args.scale),
                         vocab_size=data["vocab_size"], row_len=data["row_len"],
                         batch_size=args.batch_size or data["batch_size"], num_workers=0, positions="1d")
    dm.setup("fit")
    batch = {n: t.to(dev) for n, t in next(iter(dm.train_dataloader())).items()}
    if not torch.equal(batch["tokens"], native_batch["tokens"].to(dev)):
        raise RuntimeError("the 1-D and M-RoPE loaders gave different rows: the arms would not see the same slots")
    native_b = {n: t.to(dev) for n, t in native_batch.items()}
    encoder = scale_encoder(args.scale)
    arms = {"llava_stage1": llava_module(dec, data, encoder, train_lm=False),
            "llava_stage2": llava_module(dec, data, encoder, train_lm=True)}

    def trainer(module, b: dict):
        model = module.model.to(dev)
        module.train()  # frozen modules stay in eval mode
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

        def step() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(b["tokens"], b["modality"], b["positions"], b["image_patches"], b["audio_patches"],
                               doc_ids=b["doc_ids"])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(),
                                                         ignore_index=-100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {"native": trainer(native, native_b), **{k: trainer(m, batch) for k, m in arms.items()}}
    model = arms["llava_stage2"].model

    def encoders() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            encoders_forward(model, batch)

    med = interleaved_medians({**steps, "encoders_forward": encoders}, args.steps, sync)
    flops = float(arms["llava_stage2"].step_flops(batch))
    peak = device_peak_flops(dev)
    out = {
        "native_step_s": med["native"],
        "llava_stage1_step_s": med["llava_stage1"],
        "llava_stage2_step_s": med["llava_stage2"],
        "encoders_forward_s": med["encoders_forward"],
        "stage2_over_native": med["llava_stage2"] / med["native"],
        "stage1_over_native": med["llava_stage1"] / med["native"],
        "encoders_share_of_stage2": med["encoders_forward"] / med["llava_stage2"],
        "stage2_minus_native_minus_encoders_s": med["llava_stage2"] - med["native"] - med["encoders_forward"],
        "media_items": {k: media_layout(batch["tokens"], batch["modality"], kind).n_items
                        for k, kind in (("image", IMAGE), ("audio", AUDIO))},
        "llava_params": sum(q.numel() for q in model.parameters()),
        "llava_trainable_params": {k: sum(q.numel() for q in m.model.parameters() if q.requires_grad)
                                   for k, m in arms.items()},
        "llava_stage2_mfu": flops / med["llava_stage2"] / peak if peak else None,
    }
    cols = ["native_step_s", "llava_stage1_step_s", "llava_stage2_step_s", "encoders_forward_s",
            "stage2_over_native", "encoders_share_of_stage2", "stage2_minus_native_minus_encoders_s"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("| " + " | ".join(f"{out[c]:.3f}" for c in cols) + " |")
    return out


if __name__ == "__main__":
    main()
