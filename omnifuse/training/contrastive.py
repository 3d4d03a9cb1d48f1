"""The contrastive stages' LightningModule: CLIP (images) and CLAP (spectrograms) on pair batches.

    python train.py fit -c configs/scale/tiny.yaml -c configs/stage/clip.yaml   # runs/clip
    python train.py fit -c configs/scale/tiny.yaml -c configs/stage/clap.yaml   # runs/clap

Optimisation, logging and compute accounting are :class:`~omnifuse.training.base.FusionModule`'s;
this module says how a pair batch (:mod:`omnifuse.data.pairs`) gives a loss and FLOPs. The encoder
sizes come from the scale preset's top-level ``encoder:`` block, which ``OmniCLI`` links into
``model.model.encoder`` (a no-op for model classes without that field).
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from omnifuse.model.encoders import ContrastiveConfig, ContrastiveModel, clip_loss
from omnifuse.tokenizers.stream import AUDIO, IMAGE, MODALITIES, TEXT
from omnifuse.training.base import FusionModule, OptimConfig
from omnifuse.training.compute import causal_attention_flops, matmul_flops

CONTRASTIVE_FLOPS_FORMULA = (
    "per step: 3 * M * PatchEncoder.forward_flops(n_max) (media encoder, bidirectional attention over "
    "the padded item, forward + backward) + 6*N_text*M*T + 6*n_layers*dim*M*T*(T+1) (text tower, causal "
    "over the padded caption row; N_text = decoder matmul parameters without the unused output head) "
    "+ 6*M*dim*E (text projection) + 6*M*M*E (similarity logits); M pairs, n_max patches, T text slots, "
    "E embedding width; with hard negatives (data.hard_negatives) the text tower, projection and logits "
    "again for the M negative captions (T' slots); with model lock_text the text tower and projection run "
    "forward only (2 instead of 6 per parameter and slot, attention likewise) and the logits' backward reaches "
    "the media side only (4*M*M*E); summed over steps and ranks. omnifuse/training/contrastive.py"
)


class ContrastiveModule(FusionModule):
    """CLIP / CLAP trained from scratch with the symmetric InfoNCE loss.

    Args:
        model: the encoder pair's config (text tower = the preset's decoder block, media encoder
            = the preset's ``encoder:`` block, ``modality`` image or audio).
        lock_text: the text tower and its projection keep their initial weights (frozen, in eval mode,
            in no optimizer group); only the media encoder, its projection and the temperature learn.
            LiT (Zhai et al. 2022) locks a pretrained image tower; this locks the text one, so that
            captions that differ in one word stay apart however rarely a batch asks for that word,
            and the media encoder alone has to earn the difference (RESULTS, session 9).
        optim, compile, max_nonfinite, tasks: see :class:`~omnifuse.training.base.FusionModule`.
    """

    flops_formula = CONTRASTIVE_FLOPS_FORMULA

    def __init__(
        self,
        model: ContrastiveConfig,
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        max_nonfinite: int = 3,
        tasks: tuple[str, ...] | None = None,
        lock_text: bool = False,
    ):
        super().__init__(optim=optim, compile=compile, max_nonfinite=max_nonfinite, tasks=tasks)
        self.cfg = model
        self.model = ContrastiveModel(model)
        self.lock_text = lock_text
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.pairs_seen = 0  # all ranks

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.model.text, self.model.text_proj] if self.lock_text else []

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        want = f"{self.cfg.modality}_pairs"
        if getattr(dm.hparams, "format", None) != want:
            raise ValueError(
                f"a {self.cfg.modality} contrastive model trains on data.format={want}, got "
                f"data.format={getattr(dm.hparams, 'format', None)!r}"
            )
        self.check_vocab(self.cfg.decoder.vocab_size)

    # -- FusionModule contract ---------------------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, None]:
        return self.model.loss(batch), None

    def step_flops(self, batch: dict) -> float:
        """Training FLOPs of one pair batch on one rank (see ``CONTRASTIVE_FLOPS_FORMULA``)."""
        m, n_max = batch["mask"].shape
        text, d, e = self.model.text, self.cfg.decoder, self.cfg.embed_dim
        text_blocks = text.matmul_params() - text.output.weight.numel()  # the head never runs

        text_mode, logits_mode = ("forward", "backward_through") if self.lock_text else ("train", "train")

        def captions(t: int) -> float:  # text tower + projection + logits against the M media, per M captions
            rows = torch.full((m,), t, dtype=torch.long)
            return (matmul_flops(text_blocks, m * t, text_mode)
                    + causal_attention_flops(rows, d.n_layers, d.dim, text_mode)
                    + matmul_flops(d.dim * e, m, text_mode) + matmul_flops(m * e, m, logits_mode))

        flops = 3 * m * self.model.encoder.forward_flops(n_max) + captions(batch["text"].shape[1])
        if "neg_text" in batch:
            flops += captions(batch["neg_text"].shape[1])
        return float(flops)

    def count_slots(self, batch: dict) -> torch.Tensor:
        """Slots by modality: caption slots as text, real patches as image/audio, the rest padding."""
        mask = batch["mask"]
        media, text = mask.sum(), batch["text_lengths"].sum()  # stay on the device: no host sync
        slots = mask.numel() + batch["text"].numel()
        if "neg_text" in batch:  # the negative captions run through the text tower too
            text, slots = text + batch["neg_text_lengths"].sum(), slots + batch["neg_text"].numel()
        counts = torch.zeros(len(MODALITIES) + 1, dtype=torch.long, device=mask.device)
        counts[TEXT] = text
        counts[IMAGE if self.cfg.modality == "image" else AUDIO] = media
        counts[-1] = slots - media - text
        return counts

    def compute_extras(self) -> dict:
        return {
            "pairs_seen": self.pairs_seen,
            "modality": self.cfg.modality,
            "logit_scale": float(self.model.clamped_logit_scale().detach().exp()),
            "encoder_config": asdict(self.cfg.encoder_config()),
            "model_config": asdict(self.cfg),
        }

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        self.pairs_seen += len(batch["captions"]) * self.trainer.world_size
        out = super().training_step(batch, batch_idx)
        if self._log_step:  # the steps Lightning writes logs on
            self.log("train/logit_scale", self.model.clamped_logit_scale().exp().detach(), on_step=True)
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        media, text = self.model(batch)
        loss = clip_loss(media, text, self.model.clamped_logit_scale())
        sims = torch.nn.functional.normalize(media, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T  # (M, M)
        target = torch.arange(sims.shape[0], device=sims.device)
        m = int(sims.shape[0])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=m, sync_dist=True)
        # in-batch top-1 both ways: chance is 1/M (M = data.batch_size except the last batch)
        self.log("val/acc_media_to_text", (sims.argmax(1) == target).float().mean(), on_epoch=True, batch_size=m,
                 sync_dist=True)
        self.log("val/acc_text_to_media", (sims.argmax(0) == target).float().mean(), on_epoch=True, batch_size=m,
                 sync_dist=True)

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["omnifuse_compute"]["pairs_seen"] = self.pairs_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.pairs_seen = (checkpoint.get("omnifuse_compute") or {}).get("pairs_seen", 0)
