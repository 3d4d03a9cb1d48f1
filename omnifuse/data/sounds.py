"""Synthetic sound events for the generated world: ~1 s mono clips at 16 kHz.

A clip is a sequence of 1–4 non-overlapping events; an event is a ``kind`` (tone, buzz, hiss,
chirp, knock) at a ``pitch`` (low, mid, high). Events are separated by at least ``MIN_GAP``
seconds of near-silence so that their number and order can be read off a 32-bin log-mel
spectrogram (hop 16 ms → the gap spans ≥ 3 frames).

Everything random comes from the ``np.random.Generator`` passed in: same generator state, same
waveform, bit for bit.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
CLIP_SECONDS = 1.0
SOUND_KINDS = ("tone", "buzz", "hiss", "chirp", "knock")
PITCHES = ("low", "mid", "high")
PITCH_HZ = {"low": 300.0, "mid": 800.0, "high": 2000.0}
EVENT_SECONDS = {"tone": 0.15, "buzz": 0.15, "hiss": 0.15, "chirp": 0.15, "knock": 0.08}
MIN_GAP = 0.06  # seconds of silence between two events
EDGE = 0.01  # seconds of silence before the first event and after the last
NOISE_FLOOR = 0.002


def _event_wave(kind: str, pitch: str, rng: np.random.Generator) -> np.ndarray:
    """(T,) float64 waveform of one event, peak amplitude ≈ 1 before gain."""
    f = PITCH_HZ[pitch]
    n = int(round(EVENT_SECONDS[kind] * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fade in/out: no clicks
    if kind == "tone":
        return np.sin(2 * np.pi * f * t) * ramp
    if kind == "buzz":  # square wave: odd harmonics, heard as a buzz
        return 0.6 * np.sign(np.sin(2 * np.pi * f * t)) * ramp
    if kind == "chirp":  # linear sweep f → 2f
        dur = t[-1] if n > 1 else 1.0
        phase = 2 * np.pi * (f * t + 0.5 * f / dur * t**2)
        return np.sin(phase) * ramp
    if kind == "hiss":  # noise band-limited to [f/2, 2f] with an FFT mask
        spec = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
        spec[(freqs < f / 2) | (freqs > 2 * f)] = 0.0
        x = np.fft.irfft(spec, n)
        return x / (np.abs(x).max() + 1e-9) * ramp
    if kind == "knock":  # damped low sinusoid plus a short noise click
        env = np.exp(-t / 0.015)
        click = rng.standard_normal(n) * np.exp(-t / 0.003) * 0.5
        return (np.sin(2 * np.pi * 0.5 * f * t) + click) * env
    raise ValueError(f"unknown sound kind {kind!r}; expected one of {SOUND_KINDS}")


def sample_events(rng: np.random.Generator, count: int | None = None) -> list[dict]:
    """Draw 1–4 events (kind, pitch, onset in s, duration in s), ordered by onset."""
    if count is None:
        count = int(rng.integers(1, 5))
    kinds = [SOUND_KINDS[i] for i in rng.integers(0, len(SOUND_KINDS), count)]
    pitches = [PITCHES[i] for i in rng.integers(0, len(PITCHES), count)]
    return place_events(rng, kinds, pitches)


def place_events(rng: np.random.Generator, kinds: list[str], pitches: list[str]) -> list[dict]:
    """Give the events random onsets, in the given order, non-overlapping within the clip."""
    durs = [EVENT_SECONDS[k] for k in kinds]
    slack = CLIP_SECONDS - 2 * EDGE - sum(durs) - MIN_GAP * (len(kinds) - 1)
    if slack < 0:
        raise ValueError(f"{len(kinds)} events do not fit in {CLIP_SECONDS} s")
    extra = np.sort(rng.uniform(0.0, slack, len(kinds)))
    events, start = [], EDGE
    for i, (kind, pitch, dur) in enumerate(zip(kinds, pitches, durs)):
        onset = start + extra[i] + sum(durs[:i]) + MIN_GAP * i
        events.append({"kind": kind, "pitch": pitch, "onset": round(float(onset), 3), "duration": dur})
    return events


def synthesize(events: list[dict], rng: np.random.Generator) -> np.ndarray:
    """(SAMPLE_RATE * CLIP_SECONDS,) float32 waveform in [-1, 1] holding the given events."""
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    wave = rng.standard_normal(n) * NOISE_FLOOR
    for ev in events:
        x = _event_wave(ev["kind"], ev["pitch"], rng) * rng.uniform(0.3, 0.6)
        i = int(round(ev["onset"] * SAMPLE_RATE))
        x = x[: n - i]
        wave[i : i + len(x)] += x
    return np.clip(wave, -1.0, 1.0).astype(np.float32)
