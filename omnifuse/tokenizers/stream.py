"""The slot stream: what every sample becomes before it meets a model.

A sample (text segments and media) is tokenized into one sequence of *slots*. Each slot has

- ``tokens``     a token id; for a media patch slot it holds the pad id (the model overwrites
                 that slot's embedding with the projected patch),
- ``modality``   ``TEXT`` (0), ``IMAGE`` (1) or ``AUDIO`` (2) — structural tokens such as
                 ``<img>``, ``<row>`` and ``</aud>`` are TEXT slots, only patches are media slots,
- ``positions``  ``(t, h, w)`` multimodal rotary position (DESIGN §3.3); a text-only stream has
                 ``t = h = w = 0, 1, 2, …``,
- ``target``     True where the slot's token is a loss target (answers, captions; never a
                 media slot).

Media patches are stored apart, in slot order: ``image_patches[k]`` is the k-th IMAGE slot of
the stream, ``audio_patches[k]`` the k-th AUDIO slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT, IMAGE, AUDIO = 0, 1, 2
MODALITIES = ("text", "image", "audio")


@dataclass
class Stream:
    tokens: torch.Tensor  # (S,) long
    modality: torch.Tensor  # (S,) long
    positions: torch.Tensor  # (S, 3) long
    target: torch.Tensor  # (S,) bool
    image_patches: torch.Tensor  # (Ni, P*P*3) float, Ni == (modality == IMAGE).sum()
    audio_patches: torch.Tensor  # (Na, P*P) float,   Na == (modality == AUDIO).sum()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def validate(self) -> None:
        """Raise ValueError if the fields disagree with each other."""
        s = len(self)
        for name in ("modality", "target"):
            if getattr(self, name).shape != (s,):
                raise ValueError(f"Stream.{name} has shape {tuple(getattr(self, name).shape)}, expected ({s},)")
        if self.positions.shape != (s, 3):
            raise ValueError(f"Stream.positions has shape {tuple(self.positions.shape)}, expected ({s}, 3)")
        n_img = int((self.modality == IMAGE).sum())
        n_aud = int((self.modality == AUDIO).sum())
        if self.image_patches.shape[0] != n_img:
            raise ValueError(f"Stream has {n_img} image slots but {self.image_patches.shape[0]} image patches")
        if self.audio_patches.shape[0] != n_aud:
            raise ValueError(f"Stream has {n_aud} audio slots but {self.audio_patches.shape[0]} audio patches")
        if bool((self.target & (self.modality != TEXT)).any()):
            raise ValueError("Stream marks a media slot as a loss target")
