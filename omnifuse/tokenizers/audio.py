"""Audio front end: waveform → log-mel spectrogram.

torchaudio's wheels are tied to one torch release and do not load beside torch 2.13, so the STFT
is ``torch.stft`` and the mel filterbank is librosa's (Slaney-normalised, HTK off: librosa's
defaults, which are also Whisper's).
"""

from __future__ import annotations

from functools import lru_cache

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
