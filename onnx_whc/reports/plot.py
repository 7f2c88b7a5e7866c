"""Small line charts as PNG with Pillow alone (no plotting library among the dependencies)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127), (0, 0, 128), (128, 0, 0)]
WIDTH, HEIGHT, MARGIN = 560, 400, 60
LEGEND_ROW = 14  # the legend goes under the axes, where it covers no curve


def line_charts(panels: list[dict], path: str, title: str = "") -> None:
    """Panels side by side; each {"x": label, "y": label, "series": {name: [(x, y), ...]}}."""
    legend = LEGEND_ROW * max((len(p["series"]) for p in panels), default=0) + 8
    image = Image.new("RGB", (WIDTH * len(panels), HEIGHT + 30 + legend), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if title:
        draw.text((10, 6), title, fill="black", font=font)
    for i, panel in enumerate(panels):
        _panel(draw, font, i * WIDTH, 30, panel)
    image.save(path, format="PNG")


def _panel(draw: ImageDraw.ImageDraw, font, left: int, top: int, panel: dict) -> None:
    points = [p for series in panel["series"].values() for p in series if p[1] is not None]
    if not points:
        draw.text((left + MARGIN, top + HEIGHT // 2), "no data", fill="black", font=font)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = _padded(min(xs), max(xs))
    y0, y1 = _padded(min(ys), max(ys))
    box = (left + MARGIN, top + 10, left + WIDTH - 20, top + HEIGHT - MARGIN)

    def at(x, y):
        return (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]),
                box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))

    draw.rectangle(box, outline="black")
    for k in range(5):
        fx, fy = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        px, py = at(fx, fy)
        draw.line((px, box[3], px, box[3] + 4), fill="black")
        draw.text((px - 12, box[3] + 6), f"{fx:.3g}", fill="black", font=font)
        draw.line((box[0] - 4, py, box[0], py), fill="black")
        draw.text((box[0] - 44, py - 6), f"{fy:.3g}", fill="black", font=font)
        draw.line((box[0], py, box[2], py), fill=(225, 225, 225))
    draw.text(((box[0] + box[2]) // 2 - 40, box[3] + 22), panel["x"], fill="black", font=font)
    draw.text((left + 4, top), panel["y"], fill="black", font=font)
    for n, (name, series) in enumerate(panel["series"].items()):
        colour = COLOURS[n % len(COLOURS)]
        pts = [at(x, y) for x, y in sorted(series) if y is not None]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((box[0], top + HEIGHT + 2 + LEGEND_ROW * n), f"o {name}", fill=colour, font=font)


def _padded(lo: float, hi: float) -> tuple[float, float]:
    span = hi - lo or max(abs(hi), 1.0) * 0.1
    return lo - 0.05 * span, hi + 0.05 * span


def distill_curve(distilled: dict, path: str) -> None:
    """The held-out measure, the held-out divergence that chooses the checkpoint, and the training loss
    against minutes of distillation."""
    curve = distilled["curve"]
    minutes = lambda point: point["seconds"] / 60  # noqa: E731
    held = [(minutes(p), p["held_out"]) for p in curve]
    fit = [(minutes(p), p.get("divergence")) for p in curve]
    loss = [(minutes(p), p["loss"]) for p in curve if p["loss"] is not None]
    panels = [{"x": "minutes", "y": f"held-out {distilled['measure']}", "series": {"held out": held}}]
    if any(y is not None for _, y in fit):
        panels.append({"x": "minutes", "y": f"held-out {distilled['divergence']}", "series": {"held out": fit}})
    line_charts(panels + [{"x": "minutes", "y": "training loss", "series": {"loss": loss}}], path,
                f"distillation on {distilled['provider']}: {distilled['steps']} steps of {distilled['batch']} views")

