"""The synthetic world model's picture: a procedural landscape rendered with numpy.

``SceneRenderer`` turns (prompt, time) into a yuv420p frame; ``synthetic.py`` wraps it in the
world-model protocol (a paced track, a streamer, the model).  Frames keep moving on their own
(a camera travelling past parallax layers, drifting clouds, weather) and a prompt steers the look.

How a prompt becomes a picture
------------------------------
``_look_for_prompt`` turns a prompt into a :class:`_Look`, a flat vector of named float
parameters (sky colours, sun, terrain amplitudes, weather, camera speed, ...).  Known
keywords ("night", "desert", "rain", "fast", "neon", ...) apply hand-made presets; any
other words are hashed with BLAKE2 (stable across processes, unlike the salted ``hash()``)
into a "flavour": terrain, time of day, palette rotation and a global colour tint, so an
unknown prompt still gets its own, reproducible look.  A prompt change interpolates the
vector from the current look to the new one over ``TRANSITION_S`` seconds.

How it stays inside ~10 ms per 1280x704 frame on one core
---------------------------------------------------------
* Everything is rendered at half resolution, which is exactly the size of the U and V
  planes of yuv420p: chroma needs no resampling, and only luma is upscaled (2x, with a
  cheap integer bilinear filter).  We never build an RGB image.
* The scene is made of layers (sky, far range, sea, four land layers) whose silhouettes are
  1-D functions of x.  A per-pixel *label* map is the only 2-D geometry; colours come from a
  small (label x row) lookup table, computed per frame in RGB, converted to YUV once, and
  gathered with ``np.take``.  Sky gradients, haze, fog, snow caps, sea reflections and the
  neon grid's horizontal lines all live in that table, so they cost nothing per pixel.
* Textures (clouds, ground detail, rain, snow) are periodic noise tiles built once per
  renderer and scrolled by slicing.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from typing import Callable

import av
import numpy as np


__all__ = ["SceneRenderer", "TRANSITION_S", "prepare"]


#: How long a prompt change takes to blend from the old look to the new one.
TRANSITION_S = 1.0

# ---------------------------------------------------------------------------------------
# Looks: a named, flat float vector, so a transition is a single vector lerp.
# ---------------------------------------------------------------------------------------

_FIELDS: tuple[tuple[str, int], ...] = (
    ("sky_top", 3),  # RGB at the zenith
    ("sky_horizon", 3),  # RGB at the horizon
    ("light", 3),  # colour of the light falling on land and water
    ("sun", 1),  # sun visibility 0..1
    ("sun_rgb", 3),
    ("sun_x", 1),  # 0..1 across the frame
    ("sun_y", 1),  # elevation: 0 at the horizon, 1 near the top
    ("sun_size", 1),  # radius, in world units (frame short side = 1)
    ("moon", 1),
    ("stars", 1),
    ("clouds", 1),  # cover 0..1
    ("cloud_rgb", 3),
    ("wind", 1),  # cloud drift, world units per second
    ("fog", 1),
    ("fog_rgb", 3),
    ("rain", 1),
    ("snow", 1),
    ("horizon", 1),  # horizon row as a fraction of the frame height
    ("hills", 1),  # terrain shape amplitudes
    ("peaks", 1),
    ("trees", 1),
    ("dunes", 1),
    ("snowcap", 1),
    ("water", 1),  # 0 = land, 1 = open sea
    ("land_far", 3),
    ("land_near", 3),
    ("water_rgb", 3),
    ("detail", 1),  # ground texture strength
    ("glow", 1),  # lava veins
    ("glow_rgb", 3),
    ("grid", 1),  # neon grid
    ("grid_rgb", 3),
    ("speed", 1),  # camera speed, world units per second at the nearest layer (signed)
    ("lift", 1),  # camera altitude: pushes land down ("fly")
    ("bob", 1),  # vertical camera sway ("fly")
    ("tint", 2),  # global U/V offset, in 8-bit levels
)

_SLICES: dict[str, slice] = {}
_n = 0
for _name, _size in _FIELDS:
    _SLICES[_name] = slice(_n, _n + _size)
    _n += _size
_LOOK_SIZE = _n
del _n


class _Look:
    """A look: ``look.sky_top`` is a view into one float64 vector (writes go through)."""

    __slots__ = ("v",)

    def __init__(self, v: np.ndarray | None = None) -> None:
        object.__setattr__(self, "v", np.zeros(_LOOK_SIZE) if v is None else v)

    def __getattr__(self, name: str):
        try:
            s = _SLICES[name]
        except KeyError:
            raise AttributeError(name) from None
        return self.v[s.start] if s.stop - s.start == 1 else self.v[s]

    def __setattr__(self, name: str, value) -> None:
        self.v[_SLICES[name]] = value


def _rgb(r: float, g: float, b: float) -> np.ndarray:
    return np.array((r, g, b))


def _mix(a, b, t):
    return a + (b - a) * t


# -- Presets.  Each keyword is a function that edits a look in place.  Keywords are applied
# by category (time of day, then terrain, weather, style, motion) rather than in prompt
# order, so modifiers compose: "rain" darkens whatever time of day was chosen.


def _day(l: _Look) -> None:
    l.sky_top, l.sky_horizon = _rgb(0.20, 0.42, 0.85), _rgb(0.68, 0.82, 0.96)
    l.light, l.sun, l.sun_rgb = _rgb(1.0, 1.0, 1.0), 1.0, _rgb(1.0, 0.97, 0.85)
    l.sun_y, l.sun_size, l.moon, l.stars = 0.75, 0.035, 0.0, 0.0
    l.cloud_rgb, l.fog_rgb = _rgb(0.97, 0.97, 1.0), _rgb(0.80, 0.85, 0.90)


def _sunset(l: _Look) -> None:
    l.sky_top, l.sky_horizon = _rgb(0.16, 0.14, 0.38), _rgb(1.0, 0.50, 0.22)
    l.light, l.sun, l.sun_rgb = _rgb(1.0, 0.62, 0.42), 1.0, _rgb(1.0, 0.55, 0.20)
    l.sun_y, l.sun_size, l.moon, l.stars = 0.08, 0.06, 0.0, 0.1
    l.cloud_rgb, l.fog_rgb = _rgb(1.0, 0.60, 0.45), _rgb(0.90, 0.55, 0.40)


def _dawn(l: _Look) -> None:
    l.sky_top, l.sky_horizon = _rgb(0.30, 0.42, 0.72), _rgb(1.0, 0.78, 0.62)
    l.light, l.sun, l.sun_rgb = _rgb(1.0, 0.85, 0.75), 1.0, _rgb(1.0, 0.85, 0.60)
    l.sun_y, l.sun_size, l.moon, l.stars = 0.15, 0.045, 0.0, 0.0
    l.cloud_rgb, l.fog_rgb = _rgb(1.0, 0.85, 0.80), _rgb(0.95, 0.85, 0.80)


def _night(l: _Look) -> None:
    l.sky_top, l.sky_horizon = _rgb(0.01, 0.02, 0.08), _rgb(0.08, 0.12, 0.28)
    l.light, l.sun = _rgb(0.24, 0.30, 0.48), 0.0
    l.moon, l.stars = 1.0, 1.0
    l.cloud_rgb, l.fog_rgb = _rgb(0.12, 0.14, 0.20), _rgb(0.10, 0.12, 0.18)


def _hills(l: _Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.56, 1.0, 0.1, 0, 0, 0, 0
    l.land_far, l.land_near, l.detail = _rgb(0.35, 0.55, 0.35), _rgb(0.25, 0.50, 0.15), 0.5


def _mountains(l: _Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.60, 0.6, 1.0, 0, 0, 0.8, 0
    l.land_far, l.land_near, l.detail = _rgb(0.45, 0.50, 0.60), _rgb(0.35, 0.40, 0.25), 0.6


def _desert(l: _Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.58, 0.2, 0.0, 0, 1.0, 0, 0
    l.land_far, l.land_near, l.detail = _rgb(0.85, 0.68, 0.45), _rgb(0.90, 0.70, 0.42), 0.3
    l.clouds = min(l.clouds, 0.05)


def _ocean(l: _Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.55, 0.3, 0.3, 0, 0, 0, 1.0
    l.land_far, l.water_rgb, l.detail = _rgb(0.35, 0.45, 0.40), _rgb(0.05, 0.25, 0.45), 0.4


def _forest(l: _Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.56, 0.7, 0.0, 1.0, 0, 0, 0
    l.land_far, l.land_near, l.detail = _rgb(0.15, 0.35, 0.20), _rgb(0.06, 0.25, 0.08), 0.5


def _winter(l: _Look) -> None:
    l.land_far, l.land_near = _rgb(0.85, 0.88, 0.95), _rgb(0.95, 0.96, 1.0)
    l.water_rgb, l.snowcap = _rgb(0.45, 0.55, 0.65), 1.0
    l.snow, l.clouds = max(l.snow, 0.7), max(l.clouds, 0.6)
    l.sky_top = _mix(l.sky_top, _rgb(0.6, 0.65, 0.72) * l.light, 0.5)


def _clear(l: _Look) -> None:
    l.clouds, l.fog, l.rain, l.snow = 0.0, 0.0, 0.0, 0.0


def _cloudy(l: _Look) -> None:
    l.clouds = max(l.clouds, 0.75)


def _rain(l: _Look) -> None:
    l.rain, l.clouds, l.fog = 0.8, max(l.clouds, 0.9), max(l.fog, 0.25)
    l.cloud_rgb = l.cloud_rgb * 0.55
    l.light, l.sun, l.moon = l.light * 0.7, l.sun * 0.3, l.moon * 0.3  # behind the overcast
    grey = _rgb(0.45, 0.47, 0.50) * l.light
    l.sky_top, l.sky_horizon = _mix(l.sky_top, grey, 0.6), _mix(l.sky_horizon, grey, 0.5)


def _storm(l: _Look) -> None:
    _rain(l)
    l.rain, l.clouds, l.wind = 1.0, 1.0, l.wind * 3
    l.cloud_rgb, l.light = l.cloud_rgb * 0.6, l.light * 0.7


def _snowfall(l: _Look) -> None:
    _winter(l)
    l.snow = 0.9


def _fog(l: _Look) -> None:
    l.fog = 0.75


def _lava(l: _Look) -> None:
    l.land_far, l.land_near = _rgb(0.12, 0.07, 0.06), _rgb(0.10, 0.05, 0.04)
    l.glow, l.glow_rgb = 1.0, _rgb(1.0, 0.35, 0.05)
    l.water_rgb = _rgb(0.90, 0.30, 0.05)  # "lava ocean": a sea of lava
    l.sky_top, l.sky_horizon = _rgb(0.10, 0.02, 0.02), _rgb(0.70, 0.22, 0.05)
    l.fog, l.fog_rgb = max(l.fog, 0.3), _rgb(0.40, 0.15, 0.08)
    l.cloud_rgb, l.light = _rgb(0.25, 0.12, 0.10), _rgb(0.9, 0.5, 0.35)
    l.sun, l.sun_rgb, l.moon = 0.7, _rgb(1.0, 0.45, 0.15), 0.0  # a sun seen through smoke
    l.peaks, l.snowcap, l.trees, l.stars = max(l.peaks, 1.0), 0.0, 0.0, 0.0


def _neon(l: _Look) -> None:
    l.sky_top, l.sky_horizon = _rgb(0.04, 0.0, 0.12), _rgb(0.85, 0.15, 0.60)
    l.land_far, l.land_near = _rgb(0.25, 0.05, 0.35), _rgb(0.05, 0.0, 0.10)
    l.grid, l.grid_rgb = 1.0, _rgb(0.0, 1.0, 0.95)
    l.sun, l.sun_rgb, l.sun_y, l.sun_size, l.moon = 1.0, _rgb(1.0, 0.3, 0.7), 0.25, 0.12, 0.0
    l.stars, l.light, l.clouds = 0.6, _rgb(0.6, 0.4, 0.8), min(l.clouds, 0.1)
    l.hills, l.peaks, l.trees, l.dunes, l.snowcap = 0.3, 0.6, 0.0, 0.0, 0.0
    l.cloud_rgb, l.fog_rgb = _rgb(0.5, 0.2, 0.6), _rgb(0.5, 0.1, 0.5)


def _fast(l: _Look) -> None:
    l.speed *= 3.0


def _slow(l: _Look) -> None:
    l.speed *= 0.35


def _still(l: _Look) -> None:
    l.speed, l.wind = 0.0, l.wind * 0.3


def _fly(l: _Look) -> None:
    l.speed, l.lift, l.bob = l.speed * 2.0, 1.0, 1.0


def _reverse(l: _Look) -> None:
    l.speed = -abs(l.speed)


def _forward(l: _Look) -> None:
    l.speed = abs(l.speed)


_CATEGORIES = ("time", "terrain", "weather", "style", "motion")

_KEYWORDS: dict[str, tuple[str, Callable[[_Look], None]]] = {}


def _kw(category: str, fn: Callable[[_Look], None], *words: str) -> None:
    for w in words:
        _KEYWORDS[w] = (category, fn)


_kw("time", _day, "day", "daytime", "noon", "sunny", "midday", "afternoon", "daylight")
_kw("time", _sunset, "sunset", "dusk", "evening", "twilight", "golden")
_kw("time", _dawn, "dawn", "sunrise", "morning")
_kw("time", _night, "night", "midnight", "dark", "nighttime", "moon", "moonlight", "stars", "starry")
_kw("terrain", _hills, "hills", "hill", "meadow", "meadows", "grass", "valley", "countryside", "field")
_kw("terrain", _mountains, "mountain", "mountains", "alps", "peaks", "peak", "cliffs", "canyon")
_kw("terrain", _desert, "desert", "sand", "sandy", "dunes", "dune", "sahara")
_kw("terrain", _ocean, "ocean", "sea", "beach", "water", "lake", "coast", "island", "islands", "waves")
_kw("terrain", _forest, "forest", "forests", "woods", "jungle", "trees", "tree", "woodland")
_kw("weather", _clear, "clear", "cloudless")
_kw("weather", _cloudy, "cloudy", "clouds", "cloud", "overcast")
_kw("weather", _rain, "rain", "rainy", "raining", "drizzle")
_kw("weather", _storm, "storm", "stormy", "thunder", "thunderstorm", "lightning")
_kw("weather", _snowfall, "snow", "snowy", "snowing", "blizzard", "snowfall")
_kw("terrain", _winter, "winter", "ice", "icy", "arctic", "frozen", "glacier", "tundra")
_kw("weather", _fog, "fog", "foggy", "mist", "misty", "haze", "hazy")
_kw("style", _lava, "lava", "volcano", "volcanic", "fire", "inferno", "hell", "magma")
_kw("style", _neon, "neon", "cyber", "cyberpunk", "synthwave", "retro", "vaporwave", "tron")
_kw("motion", _fast, "fast", "faster", "speed", "rush", "racing", "quick", "zoom")
_kw("motion", _slow, "slow", "slower", "calm", "gentle", "peaceful", "lazy")
_kw("motion", _still, "still", "stop", "pause", "stationary")
_kw("motion", _fly, "fly", "flying", "flight", "soar", "soaring", "glide", "bird")
_kw("motion", _reverse, "left", "reverse", "backwards", "backward", "back")
_kw("motion", _forward, "right", "forward", "forwards")

# The built-in default terrain presets a hashed flavour can pick from.
_FLAVOUR_TERRAINS = (_hills, _mountains, _desert, _ocean, _forest, _winter)


def _default_look() -> _Look:
    l = _Look()
    l.sun_x, l.clouds, l.wind, l.speed = 0.7, 0.35, 0.02, 0.12
    l.water_rgb = _rgb(0.05, 0.25, 0.45)
    l.glow_rgb, l.grid_rgb = _rgb(1.0, 0.35, 0.05), _rgb(0.0, 1.0, 0.95)
    _day(l)
    _hills(l)
    return l


def _hue_rotate(rgb: np.ndarray, angle: float) -> np.ndarray:
    """Rotate colours about the grey axis (Rodrigues), keeping their brightness."""
    c, s = math.cos(angle), math.sin(angle)
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    m = np.array(
        [
            [c + (1 - c) * k, (1 - c) * k - sq * s, (1 - c) * k + sq * s],
            [(1 - c) * k + sq * s, c + (1 - c) * k, (1 - c) * k - sq * s],
            [(1 - c) * k - sq * s, (1 - c) * k + sq * s, c + (1 - c) * k],
        ]
    )
    return np.clip(m @ rgb, 0.0, 1.0)


def _apply_flavour(l: _Look, seed_text: str) -> None:
    """Derive a look from unknown words: stable bytes from BLAKE2, never ``hash()``."""
    b = hashlib.blake2b(seed_text.encode("utf-8"), digest_size=32).digest()
    u = [x / 255.0 for x in b]
    tod = u[0]
    (_day if tod < 0.5 else _sunset if tod < 0.7 else _dawn if tod < 0.85 else _night)(l)
    _FLAVOUR_TERRAINS[b[1] % len(_FLAVOUR_TERRAINS)](l)
    l.hills *= 0.6 + 0.8 * u[2]
    l.peaks *= 0.6 + 0.8 * u[3]
    # Palette: land anywhere on the colour wheel, sky only nudged so it still reads as sky.
    land_angle = (u[4] - 0.5) * 2.0 * math.pi
    l.land_far, l.land_near = _hue_rotate(l.land_far, land_angle), _hue_rotate(l.land_near, land_angle)
    l.water_rgb = _hue_rotate(l.water_rgb, land_angle * 0.5)
    sky_angle = (u[5] - 0.5) * math.radians(60)
    l.sky_top, l.sky_horizon = _hue_rotate(l.sky_top, sky_angle), _hue_rotate(l.sky_horizon, sky_angle)
    l.clouds = 0.9 * u[6] ** 1.5
    l.sun_x = 0.15 + 0.7 * u[7]
    l.speed *= 0.6 + 0.9 * u[8]
    if u[9] < 0.25:
        l.speed = -l.speed
    if u[10] > 0.85:
        l.fog = 0.5
    # A global chroma tint that survives any keyword presets applied afterwards: this is what
    # keeps "desert cat" and "desert dog" measurably apart.
    angle, mag = u[11] * 2.0 * math.pi, 6.0 + 4.0 * u[12]
    l.tint = (mag * math.cos(angle), mag * math.sin(angle))


_WORD = re.compile(r"[a-z0-9]+")


def _look_for_prompt(prompt: str) -> _Look:
    words = _WORD.findall(prompt.lower())
    by_category: dict[str, list[Callable[[_Look], None]]] = {c: [] for c in _CATEGORIES}
    unknown: list[str] = []
    for w in words:
        hit = _KEYWORDS.get(w) or (_KEYWORDS.get(w[:-1]) if w.endswith("s") else None)
        if hit:
            by_category[hit[0]].append(hit[1])
        else:
            unknown.append(w)
    look = _default_look()
    if unknown:
        _apply_flavour(look, " ".join(unknown))
    for cat in _CATEGORIES:
        for fn in by_category[cat]:
            fn(look)
    return look


# ---------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------

# Layers, far to near.  Label 0 is the sky; label k+1 is layer k.
_FAR, _SEA = 0, 1
_LAND = (2, 3, 4, 5)
_N_LAYERS = 6
_PARALLAX = np.array([0.10, 0.30, 0.30, 0.50, 0.75, 1.00])
_BASE = np.array([0.00, 0.03, 0.07, 0.15, 0.25, 0.36])  # below the horizon, x frame height
_AMP_HILLS = np.array([0.10, 0.0, 0.07, 0.06, 0.05, 0.04])  # world units
_AMP_PEAKS = np.array([0.28, 0.0, 0.18, 0.10, 0.05, 0.02])
_AMP_TREES = np.array([0.015, 0.0, 0.03, 0.04, 0.06, 0.08])
_AMP_DUNES = np.array([0.04, 0.0, 0.05, 0.06, 0.07, 0.06])
_TREE_W = np.array([0.012, 1.0, 0.018, 0.026, 0.04, 0.06])  # tree spacing, world units
_LIFT = np.array([0.0, 0.0, 0.04, 0.08, 0.13, 0.2])  # how far "fly" drops each layer
_NEAR = np.array([0.0, 0.0, 0.0, 0.33, 0.66, 1.0])  # land colour: far -> near mix
_HAZE = np.array([0.55, 0.0, 0.35, 0.22, 0.10, 0.0])  # aerial perspective
_FOG = np.array([0.9, 0.6, 0.75, 0.6, 0.45, 0.3])  # how much fog hides each layer

# BT.601 limited range ("studio swing"), the default a decoder assumes for untagged H.264.
_RGB2YUV = np.array(
    [
        [65.481, 128.553, 24.966],
        [-37.797, -74.203, 112.0],
        [112.0, -93.786, -18.214],
    ]
)
_YUV_OFFSET = np.array([16.0, 128.0, 128.0])


def _smoothstep(u: float) -> float:
    u = min(max(u, 0.0), 1.0)
    return u * u * (3.0 - 2.0 * u)


def _smoothstep_integral(u: float) -> float:
    """Integral of smoothstep from 0 to u (u in [0, 1]): camera position during a ramp."""
    return u * u * u - 0.5 * u**4


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


def _hash01(x: np.ndarray) -> np.ndarray:
    """Cheap deterministic per-cell pseudo-random numbers in [0, 1)."""
    s = np.sin(x * 12.9898 + 78.233) * 43758.5453
    return s - np.floor(s)


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


class _Textures:
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
def _textures(wi: int, hi: int) -> _Textures:
    return _Textures(wi, hi)


def prepare(width: int, height: int) -> None:
    """Build the textures for a frame size ahead of time (call it off the event loop)."""
    _textures(width // 2, height // 2)


class SceneRenderer:
    """Renders the procedural world as yuv420p ``av.VideoFrame``s.

    Not thread-safe: call ``set_prompt`` and ``render`` from one thread at a time (the track
    funnels both through its single render thread).

    A prompt set before the first render applies at once; later ones start a
    ``TRANSITION_S`` blend at the time of the next ``render`` call, so the same sequence of
    ``set_prompt``/``render(t)`` calls always produces the same pictures.
    """

    def __init__(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        self.width, self.height = width, height
        # Internal resolution = chroma plane size.
        self._w, self._h = wi, hi = width // 2, height // 2
        # World unit = the short side, so portrait and landscape show the same shapes.
        self._s = float(min(wi, hi))

        self._rows_f = np.arange(hi, dtype=np.float64)
        self._rows_i16 = np.arange(hi, dtype=np.int16)[:, None]
        self._rows_ip = np.arange(hi, dtype=np.intp)[:, None]
        self._x_world = (np.arange(wi) - wi / 2.0) / self._s
        self._x_centered = (np.arange(wi, dtype=np.float32) - wi / 2.0)[None, :]

        # Textures: built once per size and shared (read-only) by every renderer of that size.
        tex = _textures(wi, hi)
        self._period, self._cloud_h, self._precip_t = tex.period, tex.cloud_h, tex.precip_t
        self._clouds, self._detail, self._cloud_env_base = tex.clouds, tex.detail, tex.cloud_env
        self._rain, self._snow_near, self._snow_far = tex.rain, tex.snow_near, tex.snow_far
        self._star_y, self._star_x, self._star_b = tex.star_y, tex.star_x, tex.star_b
        self._star_w, self._star_p = tex.star_w, tex.star_p

        # Transition state: look(t) = lerp(from, to, smoothstep((t - t0) / TRANSITION_S)).
        self._from = self._to = _default_look().v
        self._t0 = 0.0
        self._x0 = 0.0  # camera position at t0
        self._pending: str | None = None
        self._rendered = False
        self.prompt = ""

    # -- prompt and time -----------------------------------------------------------------

    def set_prompt(self, prompt: str) -> None:
        """Steer towards ``prompt``; the blend starts at the next ``render`` call."""
        if not self._rendered:
            self._from = self._to = _look_for_prompt(prompt).v
            self.prompt = prompt
            return
        self._pending = prompt

    def _camera_x(self, t: float) -> float:
        """Camera position: the exact integral of the (eased) speed since t0."""
        v0 = self._from[_SLICES["speed"]][0]
        v1 = self._to[_SLICES["speed"]][0]
        tau = t - self._t0
        x = self._x0 + v0 * tau
        if tau <= 0.0 or v0 == v1:
            return x
        if tau < TRANSITION_S:
            return x + (v1 - v0) * TRANSITION_S * _smoothstep_integral(tau / TRANSITION_S)
        return x + (v1 - v0) * (0.5 * TRANSITION_S + (tau - TRANSITION_S))

    def _look_at(self, t: float) -> _Look:
        u = _smoothstep((t - self._t0) / TRANSITION_S)
        return _Look(self._from + (self._to - self._from) * u)

    def _anchor_pending(self, t: float) -> None:
        prompt, self._pending = self._pending, None
        self._x0 = self._camera_x(t)
        self._from = self._look_at(t).v
        self._to = _look_for_prompt(prompt).v
        self._t0 = t
        self.prompt = prompt

    # -- rendering -----------------------------------------------------------------------

    def render(self, t: float) -> av.VideoFrame:
        """The picture at scene time ``t`` seconds, as a yuv420p frame (pts unset)."""
        if self._pending is not None:
            self._anchor_pending(t)
        self._rendered = True
        look = self._look_at(t)
        cam = self._camera_x(t)
        y, u, v = self._render_planes(look, t, cam)
        return self._to_frame(y, u, v)

    def _ridges(self, l: _Look, cam: float, dy: float) -> np.ndarray:
        """Silhouette row of every layer at every column (far to near), shape (6, w)."""
        hi, s = self._h, self._s
        horizon = l.horizon * hi + dy
        ridges = np.empty((_N_LAYERS, self._w))
        water, lift = float(np.clip(l.water, 0.0, 1.0)), l.lift
        for k in range(_N_LAYERS):
            if k == _SEA:
                # The sea is flat; without water it sits far below the frame.
                ridges[k] = horizon + _BASE[k] * hi + (1.0 - water) * 2.0 * hi
                continue
            base = horizon + (_BASE[k] + lift * _LIFT[k]) * hi
            if k != _FAR:
                base += water * 0.9 * hi  # the sea swallows the land
            if base - s * 0.5 > hi:  # entirely below the frame: skip the maths
                ridges[k] = base
                continue
            u = self._x_world + cam * _PARALLAX[k] + k * 13.37
            height = np.zeros(self._w)
            a = l.hills * _AMP_HILLS[k]
            if a > 1e-4:
                p = 2.0 * math.pi * u
                height += a * (0.55 * np.sin(0.23 * p + k * 1.7) + 0.3 * np.sin(0.61 * p + k * 3.4 + 1.0)
                               + 0.15 * np.sin(1.37 * p + k * 5.1 + 2.0))
            a = l.peaks * _AMP_PEAKS[k] * (1.0 - 0.6 * water)
            if a > 1e-4:
                # Ridged octaves (1 - |sin|) give sharp summits and rounded valleys.
                acc = np.zeros(self._w)
                f, w = 0.35, 1.0
                for o in range(5):
                    acc += w * (1.0 - np.abs(np.sin(2.0 * math.pi * f * u + o * 2.3 + k)))
                    f, w = f * 2.1, w * 0.5
                height += a * (acc - 0.7) * 0.85
            a = l.trees * _AMP_TREES[k]
            if a > 1e-4:
                # One conifer per cell: a triangle of pseudo-random height.
                cu = u / _TREE_W[k]
                cell = np.floor(cu)
                tri = 1.0 - np.abs(2.0 * (cu - cell) - 1.0)
                height += a * (0.55 + 0.45 * _hash01(cell + 101.0 * k)) * tri
            a = l.dunes * _AMP_DUNES[k]
            if a > 1e-4:
                p = 2.0 * math.pi * 0.4 * u + k * 0.9
                height += a * (np.sin(p) + 0.35 * np.sin(2.0 * p))  # skewed: gentle up, steep down
            ridges[k] = base - s * height
        return ridges

    def _lut(self, l: _Look, t: float, horizon: float, ridges: np.ndarray) -> np.ndarray:
        """Colour of each (label, row), in YUV: shape (3, 7 * h), float32 (flat for np.take)."""
        hi, s = self._h, self._s
        y = self._rows_f[:, None]  # (h, 1) so it broadcasts against RGB
        light = l.light
        fog = float(np.clip(l.fog, 0.0, 1.0))
        fog_rgb = l.fog_rgb
        white = np.minimum(light * 1.05, 1.0)
        rgb = np.empty((_N_LAYERS + 1, hi, 3))

        # Sky: zenith-to-horizon gradient, steepening near the horizon; fog washes it out.
        g = np.clip(y / max(horizon, 1.0), 0.0, 1.0) ** 2.2
        sky = _mix(l.sky_top, l.sky_horizon, g)
        rgb[0] = _mix(sky, fog_rgb, fog * 0.6)

        # Far range: hazy, with snow caps above the snow line.
        far_base = horizon + _BASE[_FAR] * hi
        cap_line = far_base - 0.1 * s
        cap = np.clip((cap_line - y) / (0.08 * hi), 0.0, 1.0) * np.clip(l.snowcap, 0.0, 1.0)
        col = _mix(l.land_far * light, white * 0.9, cap)
        col = _mix(col, l.sky_horizon, 0.55 + 0.35 * fog)
        rgb[1] = col

        # Sea: reflects the horizon sky at grazing angles, its own colour up close, with
        # wave bands that bunch up towards the horizon.
        sea_row = ridges[_SEA, 0]
        z = np.clip((y - sea_row) / max(hi - sea_row, 1.0), 0.0, 1.0)
        col = _mix(l.sky_horizon * 0.9, l.water_rgb * light, np.clip(z * 2.5, 0.0, 1.0) ** 0.6)
        waves = 1.0 + 0.12 * np.sin(40.0 / (z + 0.06) + 2.2 * t) * (1.0 - z)
        col = col * waves
        rgb[2] = _mix(col, fog_rgb, fog * _FOG[_SEA])

        # Land layers: far-to-near colour, lit tops, darker feet, aerial perspective, fog.
        grid = float(np.clip(l.grid, 0.0, 1.0))
        if grid > 1e-3:
            # Neon grid, horizontal lines: evenly spaced in depth (depth ~ 1/(row - horizon)),
            # scrolling towards the viewer; thickness is measured in pixels so they stay crisp.
            dz = np.maximum(y - horizon, 0.5)
            depth = 0.5 * s / dz
            phase = depth / 0.25 - t * 1.5
            dist = np.abs(phase - np.round(phase)) * 0.25  # world units to the nearest line
            px = dist / (0.5 * s / dz**2)  # ... in pixels
            lines = np.clip(1.2 - px, 0.0, 1.0)
            # Near the horizon the lines get closer than a pixel: fade to their average
            # coverage instead of a solid band (a cheap anti-aliasing).
            density = np.clip(1.5 / (0.5 * dz * dz / s), 0.0, 1.0)  # line width / spacing, px
            lines += (0.4 - lines) * density
            lines *= np.clip(dz / (0.05 * hi), 0.0, 1.0) * grid
        for i, k in enumerate(_LAND):
            base_row = horizon + (_BASE[k] + l.lift * _LIFT[k]) * hi
            col = _mix(l.land_far, l.land_near, _NEAR[k]) * light
            shade = 1.0 + 0.15 * np.clip((base_row - y) / (0.1 * hi), 0.0, 1.0) - 0.3 * np.clip(
                (y - base_row) / (0.3 * hi), 0.0, 1.0
            )
            col = col * shade
            if i < 2 and l.snowcap > 1e-3:
                cap = np.clip((base_row - 0.06 * s - y) / (0.06 * hi), 0.0, 1.0) * min(l.snowcap, 1.0)
                col = _mix(col, white * 0.95, cap)
            col = _mix(col, l.sky_horizon, _HAZE[k])
            col = _mix(col, fog_rgb, min(fog * _FOG[k], 0.95))
            if grid > 1e-3:
                col = col + lines * l.grid_rgb
            rgb[k + 1] = col

        yuv = rgb @ _RGB2YUV.T + _YUV_OFFSET  # (7, h, 3)
        yuv[..., 1] += l.tint[0]
        yuv[..., 2] += l.tint[1]
        return np.ascontiguousarray(yuv.reshape(-1, 3).T, dtype=np.float32)

    def _render_planes(self, l: _Look, t: float, cam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wi, hi, s = self._w, self._h, self._s
        dy = l.bob * 0.025 * hi * math.sin(2.0 * math.pi * 0.13 * t)
        horizon = l.horizon * hi + dy

        # -- geometry: one label per pixel ---------------------------------------------
        ridges = self._ridges(l, cam, dy)
        # Nearer layers occlude farther ones, so a pixel shows the nearest layer whose ridge
        # is above it.  With m_k = min over nearer-or-equal layers of their ridge, "label >= k"
        # is exactly "row >= m_k", and the label is the count of those masks.
        starts = np.minimum.accumulate(ridges[::-1], axis=0)[::-1]
        starts = np.clip(np.ceil(starts), 0, hi).astype(np.int16)
        label = np.zeros((hi, wi), dtype=np.uint8)
        for k in range(_N_LAYERS):
            if starts[k].min() >= hi:
                break  # starts only grow with k: this layer and all nearer ones are off-frame
            label += self._rows_i16 >= starts[k][None, :]
        sky_rows = int(min(starts[0].max(), hi))  # no sky below this row

        # -- colour: gather from the (label, row) table --------------------------------
        lut = self._lut(l, t, horizon, ridges)
        idx = label.astype(np.intp)
        idx *= hi
        idx += self._rows_ip
        Y, U, V = lut[0].take(idx), lut[1].take(idx), lut[2].take(idx)

        sky = label[:sky_rows] == 0 if sky_rows else None

        # -- stars (before clouds, so clouds hide them) ----------------------------------
        stars = float(l.stars) * (1.0 - min(float(l.fog), 1.0))
        if stars > 0.01 and sky_rows:
            sy, sx = self._star_y, self._star_x
            keep = label[sy, sx] == 0
            tw = 0.7 + 0.3 * np.sin(t * self._star_w + self._star_p)
            np.add.at(Y, (sy[keep], sx[keep]), (stars * self._star_b * tw)[keep])

        # -- sun and moon -------------------------------------------------------------
        tint = np.array((0.0, l.tint[0], l.tint[1]))
        if sky_rows:
            sun = float(np.clip(l.sun, 0.0, 1.0))
            if sun > 0.01:
                yuv = l.sun_rgb @ _RGB2YUV.T + _YUV_OFFSET + tint
                self._disc(Y, U, V, label, l.sun_x * wi, horizon - l.sun_y * horizon * 0.9,
                           max(l.sun_size * s, 1.5), yuv, sun, glow=0.6, stripes=float(l.grid))
            moon = float(np.clip(l.moon, 0.0, 1.0))
            if moon > 0.01:
                yuv = _rgb(0.92, 0.93, 1.0) @ _RGB2YUV.T + _YUV_OFFSET + tint
                self._disc(Y, U, V, label, (1.0 - l.sun_x) * wi, horizon * 0.35,
                           max(0.025 * s, 1.5), yuv, moon, glow=0.25, crescent=True)

        # -- clouds ------------------------------------------------------------------
        cover = float(np.clip(l.clouds, 0.0, 1.0))
        rows = min(sky_rows, self._cloud_h)
        if cover > 0.01 and rows > 0:
            off = (l.wind * t + cam * 0.05) * s
            o = math.floor(off)
            f = np.float32(off - o)
            o %= self._period
            n = self._clouds[:rows, o : o + wi] * (1 - f)
            n += self._clouds[:rows, o + 1 : o + 1 + wi] * f  # sub-pixel drift: no stepping
            n -= 1.0 - cover
            n *= 4.0  # soft edges: opacity ramps over a quarter of the value range
            np.clip(n, 0.0, 0.92, out=n)
            env = self._cloud_env_base[:rows] * np.clip((horizon - self._rows_f[:rows]) / (0.12 * hi), 0.0, 1.0)
            n *= env.astype(np.float32)[:, None]
            n *= sky[:rows]
            c = l.cloud_rgb @ _RGB2YUV.T + _YUV_OFFSET
            for plane, target in ((Y, c[0]), (U, c[1] + l.tint[0]), (V, c[2] + l.tint[1])):
                p = plane[:rows]
                p += n * (np.float32(target) - p)

        # -- ground: texture, lava veins, neon grid (below the horizon only) --------------
        r0 = int(min(max(horizon, 0.0), hi - 1))
        ground = label[r0:] > 0
        near_off = cam * _PARALLAX[-1] * s
        o = int(math.floor(near_off)) % self._period
        tex = self._detail[r0:hi, o : o + wi]
        detail = float(l.detail)
        if detail > 0.01:
            # Stronger towards the viewer, where the eye expects texture.
            amp = np.clip((self._rows_f[r0:] - horizon) / (0.4 * hi), 0.0, 1.0) * 10.0 * detail
            Y[r0:] += tex * (amp.astype(np.float32)[:, None] * ground)
        glow = float(np.clip(l.glow, 0.0, 1.0))
        if glow > 0.01:
            # Veins along the noise's zero crossings, pulsing slowly.
            veins = np.abs(tex)
            veins *= -7.0
            veins += 1.0
            np.clip(veins, 0.0, 1.0, out=veins)
            veins *= veins
            veins *= np.float32(glow * (0.8 + 0.2 * math.sin(t * 1.3))) * (label[r0:] > 2)
            c = l.glow_rgb @ _RGB2YUV.T + _YUV_OFFSET
            for plane, target in ((Y, c[0]), (U, c[1] + l.tint[0]), (V, c[2] + l.tint[1])):
                p = plane[r0:]
                p += veins * (np.float32(target) - p)
        grid = float(np.clip(l.grid, 0.0, 1.0))
        if grid > 0.01 and r0 + 1 < hi:
            # Neon grid, vertical lines: x / (row - horizon) is lateral world position on a
            # flat floor; the camera shifts it uniformly.
            g0 = r0 + 1
            dz = (self._rows_f[g0:] - horizon).astype(np.float32)[:, None]
            lateral = self._x_centered * (1.0 / dz) * np.float32(4.0) + np.float32(cam * 8.0)
            dist = np.abs(lateral - np.round(lateral))
            dist *= dz * np.float32(0.25)  # lateral units -> pixels
            line = np.clip(1.2 - dist, 0.0, 1.0)
            line *= (np.clip(dz / (0.05 * hi), 0.0, 1.0) * grid).astype(np.float32) * (label[g0:] > 2)
            c = l.grid_rgb @ _RGB2YUV.T + _YUV_OFFSET
            for plane, target in ((Y, c[0]), (U, c[1] + l.tint[0]), (V, c[2] + l.tint[1])):
                p = plane[g0:]
                p += line * (np.float32(target) - p)

        # -- precipitation (luma only: rain and snow read as light streaks/dots) ---------
        tt = self._precip_t
        rain = float(np.clip(l.rain, 0.0, 1.0))
        if rain > 0.01:
            oy = int(-t * 1.6 * s) % tt
            ox = int(t * 0.4 * s + cam * s * 0.5) % tt
            Y += self._rain[oy : oy + hi, ox : ox + wi] * np.float32(rain * 70.0)
        snow = float(np.clip(l.snow, 0.0, 1.0))
        if snow > 0.01:
            for tile, fall, sway, gain in ((self._snow_near, 0.25, 0.04, 150.0), (self._snow_far, 0.1, 0.02, 100.0)):
                oy = int(-t * fall * s) % tt
                ox = int(sway * s * math.sin(t * 0.7) + cam * s * fall) % tt
                Y += tile[oy : oy + hi, ox : ox + wi] * np.float32(snow * gain)

        return Y, U, V

    def _disc(self, Y, U, V, label, cx, cy, r, yuv, strength, glow, stripes=0.0, crescent=False) -> None:
        """Blend an anti-aliased disc plus a soft halo into the sky, inside its bounding box."""
        hi, wi = self._h, self._w
        g = r * 2.5 + 6.0
        y0, y1 = max(int(cy - g), 0), min(int(cy + g) + 1, hi)
        x0, x1 = max(int(cx - g), 0), min(int(cx + g) + 1, wi)
        if y0 >= y1 or x0 >= x1:
            return
        dyv = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
        dxv = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
        d = np.sqrt(dxv * dxv + dyv * dyv)
        disc = np.clip(r - d + 0.5, 0.0, 1.0)
        if crescent:  # bite out an offset disc
            d2 = np.sqrt((dxv - 0.45 * r) ** 2 + (dyv + 0.15 * r) ** 2)
            disc *= 1.0 - 0.9 * np.clip(r - d2 + 0.5, 0.0, 1.0)
        if stripes > 0.01:  # synthwave sun: horizontal gaps widening towards its bottom
            rel = np.clip(dyv / r, 0.0, 1.0)
            band = (dyv / (0.16 * r)) % 1.0
            disc *= 1.0 - stripes * ((band < rel * 0.8) & (dyv > 0))
        halo = np.clip(1.0 - d / g, 0.0, 1.0)
        a = np.clip(disc + glow * halo * halo, 0.0, 1.0) * strength
        a *= label[y0:y1, x0:x1] == 0
        for plane, target in ((Y, yuv[0]), (U, yuv[1]), (V, yuv[2])):
            p = plane[y0:y1, x0:x1]
            p += a * (np.float32(target) - p)

    def _to_frame(self, Y: np.ndarray, U: np.ndarray, V: np.ndarray) -> av.VideoFrame:
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        wi, hi = self._w, self._h

        # Luma: clip to studio range, then a 2x upscale in uint16 integer maths.  Packing
        # (odd << 8 | even) into uint16 and viewing it as bytes interleaves columns for free.
        np.clip(Y, 16.0, 235.0, out=Y)
        y8 = Y.astype(np.uint16)
        wide = np.empty((hi, wi), dtype=np.uint16)
        np.add(y8[:, :-1], y8[:, 1:], out=wide[:, :-1])
        wide[:, :-1] >>= 1
        wide[:, -1] = y8[:, -1]
        wide <<= 8
        wide |= y8
        row = wide.view(np.uint8)  # (hi, 2 * wi): full-width rows

        p0 = frame.planes[0]
        out = np.frombuffer(p0, np.uint8).reshape(self.height, p0.line_size)[:, : self.width]
        out[0::2] = row
        mid = row[:-1].astype(np.uint16)
        mid += row[1:]
        mid >>= 1
        out[1:-1:2] = mid
        out[-1] = row[-1]

        for plane, src in ((frame.planes[1], U), (frame.planes[2], V)):
            np.clip(src, 16.0, 240.0, out=src)
            dst = np.frombuffer(plane, np.uint8).reshape(hi, plane.line_size)[:, :wi]
            dst[...] = src
        return frame
