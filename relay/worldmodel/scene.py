"""The synthetic world model's scene: a prompt and a clock in, yuv420p frames out.

``SceneRenderer`` turns (prompt, time) into a picture; ``synthetic.py`` wraps it in the
world-model protocol (a paced track, a streamer, the model).  Frames keep moving on their own
(a camera travelling past parallax layers, drifting clouds, weather) and a prompt steers the look:
``look.py`` maps a prompt to a look, ``painter.py`` draws a look, and this module holds what lies
between, the scene's state over time: a prompt change blends the old look into the new one over
``TRANSITION_S`` seconds while the camera's travel stays continuous.
"""

from __future__ import annotations

import av

from .look import Look, default_look, look_for_prompt
from .painter import Painter
from .textures import prepare

__all__ = ["SceneRenderer", "TRANSITION_S", "prepare"]


#: How long a prompt change takes to blend from the old look to the new one.
TRANSITION_S = 1.0


def _smoothstep(u: float) -> float:
    u = min(max(u, 0.0), 1.0)
    return u * u * (3.0 - 2.0 * u)


def _smoothstep_integral(u: float) -> float:
    """Integral of smoothstep from 0 to u (u in [0, 1]): camera position during a ramp."""
    return u * u * u - 0.5 * u**4


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
        self._painter = Painter(width, height)

        # Transition state: look(t) = lerp(from, to, smoothstep((t - t0) / TRANSITION_S)).
        self._from = self._to = default_look().v
        self._t0 = 0.0
        self._x0 = 0.0  # camera position at t0
        self._pending: str | None = None
        self._rendered = False
        self.prompt = ""

    # -- prompt and time -----------------------------------------------------------------

    def set_prompt(self, prompt: str) -> None:
        """Steer towards ``prompt``; the blend starts at the next ``render`` call."""
        if not self._rendered:
            self._from = self._to = look_for_prompt(prompt).v
            self.prompt = prompt
            return
        self._pending = prompt

    def _camera_x(self, t: float) -> float:
        """Camera position: the exact integral of the (eased) speed since t0."""
        v0, v1 = Look(self._from).speed, Look(self._to).speed
        tau = t - self._t0
        x = self._x0 + v0 * tau
        if tau <= 0.0 or v0 == v1:
            return x
        if tau < TRANSITION_S:
            return x + (v1 - v0) * TRANSITION_S * _smoothstep_integral(tau / TRANSITION_S)
        return x + (v1 - v0) * (0.5 * TRANSITION_S + (tau - TRANSITION_S))

    def _look_at(self, t: float) -> Look:
        u = _smoothstep((t - self._t0) / TRANSITION_S)
        return Look(self._from + (self._to - self._from) * u)

    def _anchor_pending(self, t: float) -> None:
        prompt, self._pending = self._pending, None
        self._x0 = self._camera_x(t)
        self._from = self._look_at(t).v
        self._to = look_for_prompt(prompt).v
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
        return self._painter.paint(look, t, cam)
