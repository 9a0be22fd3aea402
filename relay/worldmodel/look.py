"""A prompt's look: the synthetic world model's picture as a flat vector of named parameters.

``look_for_prompt`` turns a prompt into a :class:`Look` (sky colours, sun, terrain amplitudes,
weather, camera speed, ...).  Known keywords ("night", "desert", "rain", "fast", "neon", ...)
apply hand-made presets; any other words are hashed with BLAKE2 (stable across processes, unlike
the salted ``hash()``) into a "flavour": terrain, time of day, palette rotation and a global
colour tint, so an unknown prompt still gets its own, reproducible look.  Being one float vector,
a look blends into another with a single lerp (scene.py's transitions).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Callable

import numpy as np

__all__ = ["Look", "default_look", "look_for_prompt", "mix", "rgb"]

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


class Look:
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


def rgb(r: float, g: float, b: float) -> np.ndarray:
    return np.array((r, g, b))


def mix(a, b, t):
    return a + (b - a) * t


# -- Presets.  Each keyword is a function that edits a look in place.  Keywords are applied
# by category (time of day, then terrain, weather, style, motion) rather than in prompt
# order, so modifiers compose: "rain" darkens whatever time of day was chosen.


def _day(l: Look) -> None:
    l.sky_top, l.sky_horizon = rgb(0.20, 0.42, 0.85), rgb(0.68, 0.82, 0.96)
    l.light, l.sun, l.sun_rgb = rgb(1.0, 1.0, 1.0), 1.0, rgb(1.0, 0.97, 0.85)
    l.sun_y, l.sun_size, l.moon, l.stars = 0.75, 0.035, 0.0, 0.0
    l.cloud_rgb, l.fog_rgb = rgb(0.97, 0.97, 1.0), rgb(0.80, 0.85, 0.90)


def _sunset(l: Look) -> None:
    l.sky_top, l.sky_horizon = rgb(0.16, 0.14, 0.38), rgb(1.0, 0.50, 0.22)
    l.light, l.sun, l.sun_rgb = rgb(1.0, 0.62, 0.42), 1.0, rgb(1.0, 0.55, 0.20)
    l.sun_y, l.sun_size, l.moon, l.stars = 0.08, 0.06, 0.0, 0.1
    l.cloud_rgb, l.fog_rgb = rgb(1.0, 0.60, 0.45), rgb(0.90, 0.55, 0.40)


def _dawn(l: Look) -> None:
    l.sky_top, l.sky_horizon = rgb(0.30, 0.42, 0.72), rgb(1.0, 0.78, 0.62)
    l.light, l.sun, l.sun_rgb = rgb(1.0, 0.85, 0.75), 1.0, rgb(1.0, 0.85, 0.60)
    l.sun_y, l.sun_size, l.moon, l.stars = 0.15, 0.045, 0.0, 0.0
    l.cloud_rgb, l.fog_rgb = rgb(1.0, 0.85, 0.80), rgb(0.95, 0.85, 0.80)


def _night(l: Look) -> None:
    l.sky_top, l.sky_horizon = rgb(0.01, 0.02, 0.08), rgb(0.08, 0.12, 0.28)
    l.light, l.sun = rgb(0.24, 0.30, 0.48), 0.0
    l.moon, l.stars = 1.0, 1.0
    l.cloud_rgb, l.fog_rgb = rgb(0.12, 0.14, 0.20), rgb(0.10, 0.12, 0.18)


def _hills(l: Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.56, 1.0, 0.1, 0, 0, 0, 0
    l.land_far, l.land_near, l.detail = rgb(0.35, 0.55, 0.35), rgb(0.25, 0.50, 0.15), 0.5


def _mountains(l: Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.60, 0.6, 1.0, 0, 0, 0.8, 0
    l.land_far, l.land_near, l.detail = rgb(0.45, 0.50, 0.60), rgb(0.35, 0.40, 0.25), 0.6


def _desert(l: Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.58, 0.2, 0.0, 0, 1.0, 0, 0
    l.land_far, l.land_near, l.detail = rgb(0.85, 0.68, 0.45), rgb(0.90, 0.70, 0.42), 0.3
    l.clouds = min(l.clouds, 0.05)


def _ocean(l: Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.55, 0.3, 0.3, 0, 0, 0, 1.0
    l.land_far, l.water_rgb, l.detail = rgb(0.35, 0.45, 0.40), rgb(0.05, 0.25, 0.45), 0.4


def _forest(l: Look) -> None:
    l.horizon, l.hills, l.peaks, l.trees, l.dunes, l.snowcap, l.water = 0.56, 0.7, 0.0, 1.0, 0, 0, 0
    l.land_far, l.land_near, l.detail = rgb(0.15, 0.35, 0.20), rgb(0.06, 0.25, 0.08), 0.5


def _winter(l: Look) -> None:
    l.land_far, l.land_near = rgb(0.85, 0.88, 0.95), rgb(0.95, 0.96, 1.0)
    l.water_rgb, l.snowcap = rgb(0.45, 0.55, 0.65), 1.0
    l.snow, l.clouds = max(l.snow, 0.7), max(l.clouds, 0.6)
    l.sky_top = mix(l.sky_top, rgb(0.6, 0.65, 0.72) * l.light, 0.5)


def _clear(l: Look) -> None:
    l.clouds, l.fog, l.rain, l.snow = 0.0, 0.0, 0.0, 0.0


def _cloudy(l: Look) -> None:
    l.clouds = max(l.clouds, 0.75)


def _rain(l: Look) -> None:
    l.rain, l.clouds, l.fog = 0.8, max(l.clouds, 0.9), max(l.fog, 0.25)
    l.cloud_rgb = l.cloud_rgb * 0.55
    l.light, l.sun, l.moon = l.light * 0.7, l.sun * 0.3, l.moon * 0.3  # behind the overcast
    grey = rgb(0.45, 0.47, 0.50) * l.light
    l.sky_top, l.sky_horizon = mix(l.sky_top, grey, 0.6), mix(l.sky_horizon, grey, 0.5)


def _storm(l: Look) -> None:
    _rain(l)
    l.rain, l.clouds, l.wind = 1.0, 1.0, l.wind * 3
    l.cloud_rgb, l.light = l.cloud_rgb * 0.6, l.light * 0.7


def _snowfall(l: Look) -> None:
    _winter(l)
    l.snow = 0.9


def _fog(l: Look) -> None:
    l.fog = 0.75


def _lava(l: Look) -> None:
    l.land_far, l.land_near = rgb(0.12, 0.07, 0.06), rgb(0.10, 0.05, 0.04)
    l.glow, l.glow_rgb = 1.0, rgb(1.0, 0.35, 0.05)
    l.water_rgb = rgb(0.90, 0.30, 0.05)  # "lava ocean": a sea of lava
    l.sky_top, l.sky_horizon = rgb(0.10, 0.02, 0.02), rgb(0.70, 0.22, 0.05)
    l.fog, l.fog_rgb = max(l.fog, 0.3), rgb(0.40, 0.15, 0.08)
    l.cloud_rgb, l.light = rgb(0.25, 0.12, 0.10), rgb(0.9, 0.5, 0.35)
    l.sun, l.sun_rgb, l.moon = 0.7, rgb(1.0, 0.45, 0.15), 0.0  # a sun seen through smoke
    l.peaks, l.snowcap, l.trees, l.stars = max(l.peaks, 1.0), 0.0, 0.0, 0.0


def _neon(l: Look) -> None:
    l.sky_top, l.sky_horizon = rgb(0.04, 0.0, 0.12), rgb(0.85, 0.15, 0.60)
    l.land_far, l.land_near = rgb(0.25, 0.05, 0.35), rgb(0.05, 0.0, 0.10)
    l.grid, l.grid_rgb = 1.0, rgb(0.0, 1.0, 0.95)
    l.sun, l.sun_rgb, l.sun_y, l.sun_size, l.moon = 1.0, rgb(1.0, 0.3, 0.7), 0.25, 0.12, 0.0
    l.stars, l.light, l.clouds = 0.6, rgb(0.6, 0.4, 0.8), min(l.clouds, 0.1)
    l.hills, l.peaks, l.trees, l.dunes, l.snowcap = 0.3, 0.6, 0.0, 0.0, 0.0
    l.cloud_rgb, l.fog_rgb = rgb(0.5, 0.2, 0.6), rgb(0.5, 0.1, 0.5)


def _fast(l: Look) -> None:
    l.speed *= 3.0


def _slow(l: Look) -> None:
    l.speed *= 0.35


def _still(l: Look) -> None:
    l.speed, l.wind = 0.0, l.wind * 0.3


def _fly(l: Look) -> None:
    l.speed, l.lift, l.bob = l.speed * 2.0, 1.0, 1.0


def _reverse(l: Look) -> None:
    l.speed = -abs(l.speed)


def _forward(l: Look) -> None:
    l.speed = abs(l.speed)


_CATEGORIES = ("time", "terrain", "weather", "style", "motion")

_KEYWORDS: dict[str, tuple[str, Callable[[Look], None]]] = {}


def _kw(category: str, fn: Callable[[Look], None], *words: str) -> None:
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


def default_look() -> Look:
    l = Look()
    l.sun_x, l.clouds, l.wind, l.speed = 0.7, 0.35, 0.02, 0.12
    l.water_rgb = rgb(0.05, 0.25, 0.45)
    l.glow_rgb, l.grid_rgb = rgb(1.0, 0.35, 0.05), rgb(0.0, 1.0, 0.95)
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


def _apply_flavour(l: Look, seed_text: str) -> None:
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


def look_for_prompt(prompt: str) -> Look:
    words = _WORD.findall(prompt.lower())
    by_category: dict[str, list[Callable[[Look], None]]] = {c: [] for c in _CATEGORIES}
    unknown: list[str] = []
    for w in words:
        hit = _KEYWORDS.get(w) or (_KEYWORDS.get(w[:-1]) if w.endswith("s") else None)
        if hit:
            by_category[hit[0]].append(hit[1])
        else:
            unknown.append(w)
    look = default_look()
    if unknown:
        _apply_flavour(look, " ".join(unknown))
    for cat in _CATEGORIES:
        for fn in by_category[cat]:
            fn(look)
    return look
