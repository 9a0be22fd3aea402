"""The synthetic world model's renderer: a look at a time and camera position, drawn as a yuv420p frame.

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
* Textures (clouds, ground detail, rain, snow) are periodic noise tiles (textures.py) built
  once per size and scrolled by slicing.
"""

from __future__ import annotations

import math

import av
import numpy as np

from .look import Look, mix, rgb
from .textures import textures

__all__ = ["Painter"]


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


def _yuv(rgb_colour: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """RGB (any leading shape) to YUV, plus the look's global chroma tint ``(0, u, v)``."""
    return rgb_colour @ _RGB2YUV.T + _YUV_OFFSET + tint


def _blend(planes: tuple[np.ndarray, np.ndarray, np.ndarray], region, alpha: np.ndarray, yuv: np.ndarray) -> None:
    """Lay the colour ``yuv`` over the planes' ``region`` (an index) with per-pixel opacity ``alpha``."""
    for plane, target in zip(planes, yuv):
        p = plane[region]
        p += alpha * (np.float32(target) - p)
def _hash01(x: np.ndarray) -> np.ndarray:
    """Cheap deterministic per-cell pseudo-random numbers in [0, 1)."""
    s = np.sin(x * 12.9898 + 78.233) * 43758.5453
    return s - np.floor(s)


class Painter:
    """Draws a :class:`Look` at scene time ``t`` and camera position ``cam`` (world units) for
    one frame size. Stateless between frames: the same arguments always give the same pixels."""

    def __init__(self, width: int, height: int) -> None:
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

        # Textures: built once per size and shared (read-only) by every painter of that size.
        tex = textures(wi, hi)
        self._period, self._cloud_h, self._precip_t = tex.period, tex.cloud_h, tex.precip_t
        self._clouds, self._detail, self._cloud_env_base = tex.clouds, tex.detail, tex.cloud_env
        self._rain, self._snow_near, self._snow_far = tex.rain, tex.snow_near, tex.snow_far
        self._star_y, self._star_x, self._star_b = tex.star_y, tex.star_x, tex.star_b
        self._star_w, self._star_p = tex.star_w, tex.star_p

    def paint(self, look: Look, t: float, cam: float) -> av.VideoFrame:
        """The picture, as a yuv420p frame (pts unset)."""
        y, u, v = self._render_planes(look, t, cam)
        return self._to_frame(y, u, v)

    def _ridges(self, l: Look, cam: float, dy: float) -> np.ndarray:
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

    def _lut(self, l: Look, t: float, horizon: float, ridges: np.ndarray, tint: np.ndarray) -> np.ndarray:
        """Colour of each (label, row), in YUV: shape (3, 7 * h), float32 (flat for np.take)."""
        hi, s = self._h, self._s
        y = self._rows_f[:, None]  # (h, 1) so it broadcasts against RGB
        light = l.light
        fog = float(np.clip(l.fog, 0.0, 1.0))
        fog_rgb = l.fog_rgb
        white = np.minimum(light * 1.05, 1.0)
        table = np.empty((_N_LAYERS + 1, hi, 3))

        # Sky: zenith-to-horizon gradient, steepening near the horizon; fog washes it out.
        g = np.clip(y / max(horizon, 1.0), 0.0, 1.0) ** 2.2
        sky = mix(l.sky_top, l.sky_horizon, g)
        table[0] = mix(sky, fog_rgb, fog * 0.6)

        # Far range: hazy, with snow caps above the snow line.
        far_base = horizon + _BASE[_FAR] * hi
        cap_line = far_base - 0.1 * s
        cap = np.clip((cap_line - y) / (0.08 * hi), 0.0, 1.0) * np.clip(l.snowcap, 0.0, 1.0)
        col = mix(l.land_far * light, white * 0.9, cap)
        col = mix(col, l.sky_horizon, 0.55 + 0.35 * fog)
        table[1] = col

        # Sea: reflects the horizon sky at grazing angles, its own colour up close, with
        # wave bands that bunch up towards the horizon.
        sea_row = ridges[_SEA, 0]
        z = np.clip((y - sea_row) / max(hi - sea_row, 1.0), 0.0, 1.0)
        col = mix(l.sky_horizon * 0.9, l.water_rgb * light, np.clip(z * 2.5, 0.0, 1.0) ** 0.6)
        waves = 1.0 + 0.12 * np.sin(40.0 / (z + 0.06) + 2.2 * t) * (1.0 - z)
        col = col * waves
        table[2] = mix(col, fog_rgb, fog * _FOG[_SEA])

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
            col = mix(l.land_far, l.land_near, _NEAR[k]) * light
            shade = 1.0 + 0.15 * np.clip((base_row - y) / (0.1 * hi), 0.0, 1.0) - 0.3 * np.clip(
                (y - base_row) / (0.3 * hi), 0.0, 1.0
            )
            col = col * shade
            if i < 2 and l.snowcap > 1e-3:
                cap = np.clip((base_row - 0.06 * s - y) / (0.06 * hi), 0.0, 1.0) * min(l.snowcap, 1.0)
                col = mix(col, white * 0.95, cap)
            col = mix(col, l.sky_horizon, _HAZE[k])
            col = mix(col, fog_rgb, min(fog * _FOG[k], 0.95))
            if grid > 1e-3:
                col = col + lines * l.grid_rgb
            table[k + 1] = col

        yuv = _yuv(table, tint)  # (7, h, 3)
        return np.ascontiguousarray(yuv.reshape(-1, 3).T, dtype=np.float32)

    def _render_planes(self, l: Look, t: float, cam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wi, hi, s = self._w, self._h, self._s
        dy = l.bob * 0.025 * hi * math.sin(2.0 * math.pi * 0.13 * t)
        horizon = l.horizon * hi + dy
        tint = np.array((0.0, l.tint[0], l.tint[1]))  # the look's chroma offset, added to every colour

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
        lut = self._lut(l, t, horizon, ridges, tint)
        idx = label.astype(np.intp)
        idx *= hi
        idx += self._rows_ip
        Y, U, V = planes = lut[0].take(idx), lut[1].take(idx), lut[2].take(idx)

        sky = label[:sky_rows] == 0 if sky_rows else None

        # -- stars (before clouds, so clouds hide them) ----------------------------------
        stars = float(l.stars) * (1.0 - min(float(l.fog), 1.0))
        if stars > 0.01 and sky_rows:
            sy, sx = self._star_y, self._star_x
            keep = label[sy, sx] == 0
            tw = 0.7 + 0.3 * np.sin(t * self._star_w + self._star_p)
            np.add.at(Y, (sy[keep], sx[keep]), (stars * self._star_b * tw)[keep])

        # -- sun and moon -------------------------------------------------------------
        if sky_rows:
            sun = float(np.clip(l.sun, 0.0, 1.0))
            if sun > 0.01:
                yuv = _yuv(l.sun_rgb, tint)
                self._disc(planes, label, l.sun_x * wi, horizon - l.sun_y * horizon * 0.9,
                           max(l.sun_size * s, 1.5), yuv, sun, glow=0.6, stripes=float(l.grid))
            moon = float(np.clip(l.moon, 0.0, 1.0))
            if moon > 0.01:
                yuv = _yuv(rgb(0.92, 0.93, 1.0), tint)
                self._disc(planes, label, (1.0 - l.sun_x) * wi, horizon * 0.35,
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
            _blend(planes, np.s_[:rows], n, _yuv(l.cloud_rgb, tint))

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
            _blend(planes, np.s_[r0:], veins, _yuv(l.glow_rgb, tint))
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
            _blend(planes, np.s_[g0:], line, _yuv(l.grid_rgb, tint))

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

    def _disc(self, planes, label, cx, cy, r, yuv, strength, glow, stripes=0.0, crescent=False) -> None:
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
        _blend(planes, np.s_[y0:y1, x0:x1], a, yuv)

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

