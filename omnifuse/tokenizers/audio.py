"""Audio front end: waveform → log-mel spectrogram → grid of P×P spectrogram patches.

torchaudio's wheels are tied to one torch release and do not load beside torch 2.13, so the STFT
is ``torch.stft`` and the mel filterbank is librosa's (Slaney-normalised, HTK off: librosa's
defaults, which are also Whisper's).

A spectrogram is tokenized like a one-channel image whose rows are frequency bands (mel bin 0,
the lowest frequency, is row 0) and whose columns are time frames: :func:`patchify_spectrogram`.
"""

from __future__ import annotations

from functools import lru_cache

from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATE = 16_000
N_FFT = 512
HOP = 256
N_MELS = 32
LOG_FLOOR = 1e-10


@lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32 mel filterbank."""
    import librosa  # imported lazily: it pulls numba, which is slow to import

    fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)
    return torch.from_numpy(np.ascontiguousarray(fb, dtype=np.float32))


def log_mel(
    wave: torch.Tensor | np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    hop: int = HOP,
    n_mels: int = N_MELS,
) -> torch.Tensor:
    """Natural-log mel power spectrogram of a mono waveform.

    Args:
        wave: (T,) float waveform in [-1, 1].
    Returns:
        (n_mels, frames) float32, frames = 1 + T // hop (centred STFT).
    """
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.ndim != 1:
        raise ValueError(f"log_mel expects a mono (T,) waveform, got shape {tuple(wave.shape)}")
    window = torch.hann_window(n_fft)
    spec = torch.stft(wave, n_fft=n_fft, hop_length=hop, window=window, center=True, return_complex=True)
    power = spec.abs() ** 2  # (n_fft//2+1, frames)
    mel = mel_filterbank(sample_rate, n_fft, n_mels) @ power  # (n_mels, frames)
    return torch.log(mel.clamp_min(LOG_FLOOR))


# Fixed normalisation of log-mel values: x -> (x + AUDIO_NORM_SHIFT) / AUDIO_NORM_SCALE.
# log_mel's values lie in [log(LOG_FLOOR), ~+6]: silence sits exactly at log(1e-10) = -23.03 and a
# full-scale tone peaks near +5 (0.9·sin → 5.2, 0.5·sin → 3.9, white noise at 0.1 rms → ≈ -3).
# Shift 9 and scale 14 map the floor to -1.0 and a +5 peak to +1.0: the same [-1, 1] range as
# normalised pixels, fixed (no data statistics) so every run and split sees the same mapping.
AUDIO_NORM_SHIFT = 9.0
AUDIO_NORM_SCALE = 14.0
SILENCE = float(np.log(LOG_FLOOR))  # log-mel value of silence; pads spectrograms up to a multiple of P


def normalize_log_mel(spec: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(x + AUDIO_NORM_SHIFT) / AUDIO_NORM_SCALE`` as float32 (silence → -1, a loud tone's peak → ≈ +1)."""
    x = spec.numpy() if isinstance(spec, torch.Tensor) else np.asarray(spec)
    return ((x.astype(np.float32) + AUDIO_NORM_SHIFT) / AUDIO_NORM_SCALE).astype(np.float32)


def patchify_spectrogram(spec: np.ndarray | torch.Tensor, patch: int, *, pad_value: float = SILENCE) -> np.ndarray:
    """Cut a ``(n_mels, frames)`` spectrogram into a grid of flattened P×P patches.

    Frames (and mel bins, if ``n_mels`` is not a multiple of P) are padded at the end with
    ``pad_value`` (default: the log-mel value of silence). Returns
    ``(rows, cols, P*P)`` with rows = frequency bands ``ceil(n_mels/P)``, cols = time steps
    ``ceil(frames/P)``; patch ``[r, c]`` is ``spec[r*P:(r+1)*P, c*P:(c+1)*P]`` flattened in
    (frequency, time) order.
    """
    x = spec.numpy() if isinstance(spec, torch.Tensor) else np.asarray(spec)
    if x.ndim != 2:
        raise ValueError(f"patchify_spectrogram expects (n_mels, frames), got shape {x.shape}")
    if patch < 1:
        raise ValueError(f"patch must be >= 1, got {patch}")
    x = np.pad(x, ((0, -x.shape[0] % patch), (0, -x.shape[1] % patch)), constant_values=pad_value)
    rows, cols = x.shape[0] // patch, x.shape[1] // patch
    x = x.reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3)  # (rows, cols, P_freq, P_time)
    return np.ascontiguousarray(x.reshape(rows, cols, patch * patch))  # (rows, cols, P*P)


@dataclass
class AudioTokenizer:
    """Log-mel spectrogram ``(n_mels, frames)`` → one patch grid ``(rows, cols, P*P)`` float32.

    Padding (silence) is applied before normalisation, so padded cells read as silence (-1).
    """

    patch: int = 8
    normalize: bool = True
    n_mels: int = N_MELS

    def __post_init__(self) -> None:
        if self.patch < 1:
            raise ValueError(f"AudioTokenizer.patch must be >= 1, got {self.patch}")

    @property
    def patch_dim(self) -> int:
        """Feature width of one audio slot: ``P*P``."""
        return self.patch * self.patch

    def __call__(self, spec: np.ndarray | torch.Tensor) -> np.ndarray:
        x = spec.numpy() if isinstance(spec, torch.Tensor) else np.asarray(spec)
        if x.ndim != 2 or x.shape[0] != self.n_mels:
            raise ValueError(f"AudioTokenizer expects a ({self.n_mels}, frames) log-mel spectrogram, got shape {x.shape}")
        grid = patchify_spectrogram(x.astype(np.float32), self.patch)  # (rows, cols, P*P)
        return normalize_log_mel(grid) if self.normalize else grid
