"""The synthetic world's textures: periodic noise tiles (clouds, ground detail, rain, snow) and
star positions, built once per internal size from a fixed seed and shared read-only by every
renderer of that size (painter.py scrolls them by slicing)."""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["Textures", "prepare", "textures"]

def _periodic_noise(
    rng: np.random.Generator, h: int, w: int, scale_y: float, scale_x: float, beta: float, lowcut: float = 0.0
) -> np.ndarray:
    """Tileable fractal noise via spectral synthesis; values are rank-normalised to [0, 1).

    Amplitude falls as f**-beta (higher beta = smoother); frequencies below ``lowcut``
    (cycles per texel) are removed, which caps the feature size.

    Filtering white noise in the Fourier domain makes it periodic in both axes for free, and
    rank-normalising makes "cover" thresholds mean what they say (cover 0.3 = 30 % of texels).
    """
    fy = np.fft.fftfreq(h)[:, None] * scale_y
    fx = np.fft.rfftfreq(w)[None, :] * scale_x
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-beta)
    amp[f < max(lowcut, 1e-9)] = 0.0
    spec = np.fft.rfft2(rng.standard_normal((h, w))) * amp
    n = np.fft.irfft2(spec, s=(h, w))
    ranks = np.empty(n.size)
    ranks[np.argsort(n, axis=None)] = np.arange(n.size) / n.size
    return ranks.reshape(h, w).astype(np.float32)


def _wrap_x(tile: np.ndarray, extra: int) -> np.ndarray:
    """Append the first ``extra`` columns so any ``[:, o:o+extra]`` slice (o < period) wraps."""
    reps = -(-extra // tile.shape[1]) + 1
    return np.ascontiguousarray(np.tile(tile, (1, reps))[:, : tile.shape[1] + extra])


def _wrap_xy(tile: np.ndarray, h: int, w: int) -> np.ndarray:
    th, tw = tile.shape
    return np.ascontiguousarray(np.tile(tile, (-(-h // th) + 1, -(-w // tw) + 1))[: th + h, : tw + w])



def _rain_tile(rng: np.random.Generator, t: int) -> np.ndarray:
    """Slanted streaks: sparse drops smeared along the fall direction."""
    drops = (rng.random((t, t)) < 0.004).astype(np.float32) * rng.random((t, t), dtype=np.float32)
    out = np.zeros_like(drops)
    for i in range(10):  # a 10-px streak, leaning one column every four rows
        out += np.roll(drops, (i, -(i // 4)), axis=(0, 1)) * (1.0 - i / 12.0)
    return np.clip(out, 0.0, 1.0)


def _snow_tile(rng: np.random.Generator, t: int, per_flake: int, big: bool) -> np.ndarray:
    flakes = (rng.random((t, t)) < 1.0 / per_flake).astype(np.float32)
    flakes *= 0.5 + 0.5 * rng.random((t, t), dtype=np.float32)
    if big:  # 2x2 flakes for the near layer
        flakes = np.maximum(flakes, np.roll(flakes, 1, 0))
        flakes = np.maximum(flakes, np.roll(flakes, 1, 1))
    return flakes


class Textures:
    """Noise tiles and star positions for one internal size (tens of ms to build)."""

    def __init__(self, wi: int, hi: int) -> None:
        rng = np.random.default_rng(20240613)  # fixed: every renderer draws the same world
        s = min(wi, hi)
        self.period = period = max(256, int(round(3.0 * s / 64.0)) * 64)
        self.cloud_h = ch = max(8, int(hi * 0.62))
        # Clouds: x frequencies are damped harder, so masses are wider than tall.
        self.clouds = _wrap_x(_periodic_noise(rng, ch, period, 1.0, 2.5, 1.45), wi + 1)
        # Cloud envelope: denser high up, thinning towards the horizon.
        self.cloud_env = np.linspace(1.0, 0.6, ch, dtype=np.float32)
        # Ground detail in [-1, 1], flattened like a floor seen at a low angle.  Smooth
        # (beta 2.2) so its zero crossings make clean lava veins; low cut bounds blob size.
        self.detail = _wrap_x((_periodic_noise(rng, hi, period, 1.0, 3.0, 2.2, lowcut=0.02) - 0.5) * 2.0, wi + 1)

        self.precip_t = t = 128
        self.rain = _wrap_xy(_rain_tile(rng, t), hi, wi)
        self.snow_near = _wrap_xy(_snow_tile(rng, t, 90, big=True), hi, wi)
        self.snow_far = _wrap_xy(_snow_tile(rng, t, 260, big=False), hi, wi)

        n_stars = max(32, wi * hi // 900)
        self.star_y = rng.integers(0, max(1, int(hi * 0.7)), n_stars)
        self.star_x = rng.integers(0, wi, n_stars)
        self.star_b = (rng.random(n_stars) ** 3 * 70 + 15).astype(np.float32)
        self.star_w = rng.random(n_stars) * 3 + 1
        self.star_p = rng.random(n_stars) * 2 * math.pi

        for value in vars(self).values():  # shared between renderers: never write
            if isinstance(value, np.ndarray):
                value.flags.writeable = False


@functools.lru_cache(maxsize=4)
def textures(wi: int, hi: int) -> Textures:
    return Textures(wi, hi)


def prepare(width: int, height: int) -> None:
    """Build the textures for a frame size ahead of time (call it off the event loop)."""
    textures(width // 2, height // 2)
