"""The live overlay: each video frame with the current decision drawn on it (Pillow), and its writer (PyAV).

+--------------------------------------------------+
| RISK HIGH  P(high) 0.83                          |  risk colour bar (green, yellow, orange, red)
|                                                  |
|                                        +------+  |
|                                        |  <-  |  |  action arrow (stop: a red square)
| reason  human                          +------+  |
| action  turn_left   conf 0.71                    |
| [risk timeline: one cell per decision, P(high)]  |
+--------------------------------------------------+
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any, cast

import numpy as np

from sim.core import labels as L

RISK_RGB = {"none": (46, 160, 67), "low": (190, 200, 40), "medium": (240, 140, 20), "high": (215, 30, 30)}
WAITING_RGB = (110, 110, 110)
# Direction of the arrow per action, in image coordinates (y grows downwards); None: a stop sign.
ARROWS: dict[str, tuple[float, float] | None] = {
    "continue": (0.0, -1.0),
    "slow": (0.0, -0.5),
    "stop": None,
    "reverse": (0.0, 1.0),
    "turn_left": (-1.0, 0.0),
    "turn_right": (1.0, 0.0),
}


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


class OverlayPainter:
    """Draws decisions onto frames; keeps the recent ones for the timeline.

    Args:
        width, height: frame size in pixels (the drawing scales with the height).
        timeline: how many recent decisions the timeline shows.
    """

    def __init__(self, width: int, height: int, timeline: int = 48) -> None:
        self.width, self.height = int(width), int(height)
        self.unit = max(9, self.height // 18)
        self.font = _font(self.unit)
        self.small = _font(max(8, int(self.unit * 0.8)))
        self.history: deque[dict[str, Any]] = deque(maxlen=int(timeline))

    def add(self, decision: dict[str, Any]) -> None:
        self.history.append(decision)

    def draw(self, frame: np.ndarray, decision: dict[str, Any] | None, status: str = "") -> np.ndarray:
        """The frame `[H, W, 3]` uint8 with `decision` (or, before the first one, `status`) drawn on it."""
        from PIL import Image, ImageDraw

        img = Image.fromarray(frame).convert("RGBA")
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        u, W, _H = self.unit, self.width, self.height
        bar_h = int(u * 1.6)
        if decision is None:
            d.rectangle([0, 0, W, bar_h], fill=(*WAITING_RGB, 210))
            d.text(
                (u // 2, bar_h // 2),
                status or "waiting for the first window",
                font=self.font,
                fill="white",
                anchor="lm",
            )
        else:
            risk = decision["risk"]
            p_high = risk["probs"].get("high", 0.0)
            d.rectangle([0, 0, W, bar_h], fill=(*RISK_RGB[risk["label"]], 220))
            # The filled share of a thin strip under the bar is P(high): how close "high" is.
            d.rectangle([0, bar_h, int(W * p_high), bar_h + max(2, u // 4)], fill=(*RISK_RGB["high"], 255))
            d.text(
                (u // 2, bar_h // 2),
                f"RISK {risk['label'].upper()}   P(high) {p_high:.2f}",
                font=self.font,
                fill="white",
                anchor="lm",
            )
            self._panel(d, decision)
            self._arrow(d, decision["action"]["label"])
        self._timeline(d)
        return np.asarray(Image.alpha_composite(img, layer).convert("RGB"))

    def _panel(self, d: Any, decision: dict[str, Any]) -> None:
        u, H = self.unit, self.height
        lines = [
            f"reason  {decision['reason']['label']}",
            f"action  {decision['action']['label']}   conf {decision['confidence']:.2f}",
        ]
        top = H - int(u * 2.6) - len(lines) * int(u * 1.25)
        width = int(max(d.textlength(s, font=self.font) for s in lines)) + u
        d.rectangle([0, top - u // 3, width, top + len(lines) * int(u * 1.25)], fill=(0, 0, 0, 150))
        for i, s in enumerate(lines):
            d.text((u // 2, top + i * int(u * 1.25)), s, font=self.font, fill="white")

    def _arrow(self, d: Any, action: str) -> None:
        u, W, H = self.unit, self.width, self.height
        r = int(u * 1.6)
        cx, cy = W - r - u // 2, H // 2
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=(0, 0, 0, 130))
        direction = ARROWS.get(action)
        if direction is None:
            s = int(r * 0.6)
            d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=(*RISK_RGB["high"], 255))
            return
        dx, dy = direction
        length = r * 0.85 * math.hypot(dx, dy)
        ux, uy = dx / math.hypot(dx, dy), dy / math.hypot(dx, dy)
        tail = (cx - ux * length, cy - uy * length)
        tip = (cx + ux * length, cy + uy * length)
        head = r * 0.5
        base = (tip[0] - ux * head, tip[1] - uy * head)
        px, py = -uy, ux  # perpendicular
        d.line([tail, base], fill="white", width=max(2, u // 3))
        d.polygon(
            [
                tip,
                (base[0] + px * head * 0.6, base[1] + py * head * 0.6),
                (base[0] - px * head * 0.6, base[1] - py * head * 0.6),
            ],
            fill="white",
        )

    def _timeline(self, d: Any) -> None:
        """One cell per recent decision, coloured by its risk, as tall as its P(high)."""
        u, W, H = self.unit, self.width, self.height
        h = int(u * 1.6)
        top = H - h - u // 3
        n = self.history.maxlen or 1
        cell = max(1.0, (W - u) / n)
        d.rectangle([u // 2, top, u // 2 + int(cell * n), top + h], fill=(0, 0, 0, 120))
        for i, dec in enumerate(self.history):
            p = dec["risk"]["probs"].get("high", 0.0)
            x0 = u // 2 + int(i * cell)
            d.rectangle(
                [x0, top + int(h * (1 - max(p, 0.08))), x0 + max(1, int(cell) - 1), top + h],
                fill=(*RISK_RGB[dec["risk"]["label"]], 255),
            )
        # Drawn last, inside the strip's right end: the cells grow from the left towards it.
        d.text(
            (u // 2 + int(cell * n) - 3, top + h // 2),
            "risk timeline",
            font=self.small,
            fill=(255, 255, 255, 220),
            anchor="rm",
        )


class OverlayWriter:
    """An H.264 MP4 (PyAV) at the stream's frame rate; frames of odd size are cropped to even (yuv420p)."""

    def __init__(self, path: str | Path, width: int, height: int, rate: float) -> None:
        from fractions import Fraction

        import av

        self.path = Path(path)
        self.width, self.height = int(width) - int(width) % 2, int(height) - int(height) % 2
        self.container = av.open(str(self.path), "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = cast(Any, self.container.add_stream(codec, rate=Fraction(rate).limit_denominator(1001)))
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        if codec == "libx264":
            self.stream.options = {"preset": "veryfast", "crf": "23"}
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[: self.height, : self.width]), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


# A label added to sim.core.labels must get a colour and an arrow here before anything is drawn with it.
assert set(RISK_RGB) == set(L.LABELS["risk"]) and set(ARROWS) == set(L.LABELS["action"])
