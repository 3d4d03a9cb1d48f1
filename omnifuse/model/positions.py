"""Multimodal rotary position embedding (M-RoPE, Qwen2-VL), in torchtune's RoPE convention.

The ``head_dim // 2`` rotary frequency pairs are split into three consecutive sections
``(t, h, w)`` (lowest index = highest frequency first, as in torchtune); pair ``i`` of section
``c`` is rotated by angle ``positions[..., c] * theta_i``. Pairs are interleaved —
``(x[..., 2i], x[..., 2i+1])`` — exactly as in :class:`torchtune.modules.RotaryPositionalEmbeddings`,
so for a text-only stream (``t = h = w``) the result equals torchtune's RoPE bit for bit.

In ``"1d"`` mode every pair uses the ``t`` component: plain RoPE over whatever flat numbering
the data side wrote into ``t``.
"""

from __future__ import annotations

import torch
from torch import nn


class MultimodalRotaryEmbedding(nn.Module):
    """Rotate queries/keys by a 3-component position.

    Args:
        head_dim: dimension of one attention head (even).
        sections: frequency pairs per component ``(t, h, w)``, summing to ``head_dim // 2``.
        base: RoPE base.
        mode: ``"mrope"`` or ``"1d"`` (only ``t`` is used).
    """

    def __init__(self, head_dim: int, sections: tuple[int, int, int], base: float = 10000.0, mode: str = "mrope"):
        super().__init__()
        if head_dim % 2 != 0 or sum(sections) != head_dim // 2:
            raise ValueError(f"M-RoPE sections {sections} must sum to head_dim // 2 = {head_dim // 2}")
        if mode not in ("mrope", "1d"):
            raise ValueError(f"M-RoPE mode must be 'mrope' or '1d', got {mode!r}")
        self.head_dim = head_dim
        self.sections = tuple(sections)
        self.mode = mode
        # Same expression as torchtune's rope_init, so the angles are bitwise identical.
        theta = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        self.register_buffer("theta", theta, persistent=False)  # (hd/2,)
        if mode == "mrope":
            component = torch.repeat_interleave(torch.arange(3), torch.tensor(self.sections))
        else:
            component = torch.zeros(head_dim // 2, dtype=torch.long)
        self.register_buffer("component", component, persistent=False)  # (hd/2,) in {0, 1, 2}
        self.register_buffer("sign", torch.tensor([-1.0, 1.0]), persistent=False)  # (2,)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions (B, S, 3)`` long -> ``cos, sin`` each ``(B, S, hd/2)`` float32."""
        if positions.dim() != 3 or positions.shape[-1] != 3:
            raise ValueError(f"M-RoPE positions must have shape (B, S, 3), got {tuple(positions.shape)}")
        pos = positions[..., self.component].float()  # (B, S, hd/2): each pair's own position
        idx_theta = pos * self.theta  # (B, S, hd/2)
        return torch.cos(idx_theta), torch.sin(idx_theta)

    def rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions (B, S, 3)`` long -> ``cos, sin`` each ``(B, S, 1, hd)`` float32: each pair's
        angle on both of its channels, ready for :meth:`rotate` of queries and keys of any head
        count. A decoder computes it once per forward and hands it to every layer."""
        cos, sin = self.angles(positions)  # (B, S, hd/2) each
        cos = cos.repeat_interleave(2, dim=-1).unsqueeze(2)  # (B, S, 1, hd): pair i -> channels 2i, 2i+1
        sin = sin.repeat_interleave(2, dim=-1).unsqueeze(2)  # (B, S, 1, hd)
        return cos, sin

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x (B, S, n_h, hd)`` by a :meth:`rotation` ``cos, sin (B, S, 1, hd)``."""
        hd = x.shape[-1]
        xf = x.float()
        # (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]); out = x cos + rot(x) sin is torchtune's formula term
        # for term (a - b == a + (-b) exactly), written without a 5-D stack so that compiled
        # flex_attention receives a plain 4-D tensor.
        rot = (xf.unflatten(-1, (hd // 2, 2)).flip(-1) * self.sign).flatten(-2)  # (B, S, n_h, hd)
        return (xf * cos + rot * sin).type_as(x)  # (B, S, n_h, hd)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x (B, S, n_h, hd)`` by ``input_pos (B, S, 3)`` (``None``: ``t=h=w=0..S-1``)."""
        b, s, _, _ = x.shape
        if input_pos is None:
            input_pos = torch.arange(s, device=x.device).view(1, s, 1).expand(b, s, 3)
        return self.rotate(x, *self.rotation(input_pos))
