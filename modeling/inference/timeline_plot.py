"""Picture of how the predicted emotion moves through a clip.

One line per class (probability at each window's centre), the clip-level answer in
the title, empty windows as gaps, a strip of face thumbnails placed at their times
along the top and, for audio-visual predictions, a panel of face features under the
probabilities on the same time axis (the blendshapes that move most, or the face
detector's probability), so a smile can be seen rising with "happy". Matplotlib's
Agg backend only: works on headless workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modeling.inference.predictions import FilePrediction, Thumbnail


def timeline_arrays(prediction: FilePrediction) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(window centres (N,), class names, probabilities (N, C) with NaN for empty windows)."""
    names = list(prediction.probabilities) or next((list(w.probabilities) for w in prediction.timeline if w.probabilities), [])
    centres = np.array([(w.start_s + w.end_s) / 2 for w in prediction.timeline], dtype=np.float64)  # (N,)
    probs = np.full((len(prediction.timeline), len(names)), np.nan)  # (N, C)
    for i, window in enumerate(prediction.timeline):
        if window.probabilities is not None:
            probs[i] = [window.probabilities[n] for n in names]
    return centres, names, probs


def plot_timeline(
    prediction: FilePrediction,
    out_png: str | Path,
    thumbnails: Sequence[Thumbnail] | None = None,
    title: str | None = None,
    dpi: int = 100,
    face_features: bool = True,
) -> Path:
    """Write the timeline figure of ``prediction`` to ``out_png``; returns the path.

    ``thumbnails`` default to the ones kept in the prediction (face crops at their
    times); pass ``[]`` for none. ``face_features``: add the face panel when the
    prediction carries a face trace. Raises ValueError for a failed prediction.
    """
    import matplotlib.pyplot as plt

    fig = timeline_figure(prediction, thumbnails, title, face_features)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


def timeline_figure(
    prediction: FilePrediction, thumbnails: Sequence[Thumbnail] | None = None, title: str | None = None, face_features: bool = True
):  # -> matplotlib.figure.Figure; the caller closes it
    """The figure :func:`plot_timeline` writes (see there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not prediction.ok:
        raise ValueError(f"cannot plot {prediction.path}: its prediction failed ({prediction.error})")
    if not prediction.timeline:
        raise ValueError(f"cannot plot {prediction.path}: its prediction has no timeline")
    thumbs = list(prediction.thumbnails if thumbnails is None else thumbnails)
    centres, names, probs = timeline_arrays(prediction)
    duration = float(prediction.duration_s or max(w.end_s for w in prediction.timeline))

    trace = prediction.face_trace if face_features else None
    # rows, top to bottom: thumbnails (optional), probabilities, face features (optional)
    heights = ([1.0] if thumbs else []) + [3.0] + ([2.0] if trace is not None else [])
    fig = plt.figure(figsize=(9, 1.0 + 0.9 * sum(heights)))
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.12)
    row = 1 if thumbs else 0
    ax = fig.add_subplot(grid[row])
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c, name in enumerate(names):
        # A single-window clip is a point; markers keep it visible.
        ax.plot(centres, probs[:, c], marker="o" if len(centres) < 3 else None, ms=4, lw=1.8, color=colours(c % colours.N), label=name)
    ax.set_xlim(0, duration)
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s), window centre" if trace is None else "")
    ax.set_ylabel("probability")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    if trace is not None:
        face_ax = fig.add_subplot(grid[row + 1], sharex=ax)
        face_ax.set_label("face features")  # found by tests and tools by this label
        for k, name in enumerate(trace.names):
            # per frame, not per window: the face panel shows when an expression starts, the windows above smooth it
            face_ax.plot(trace.times, trace.values[:, k], lw=1.4, color=plt.get_cmap("Dark2")(k % 8), label=name)
        face_ax.set_ylim(0, 1.02)
        face_ax.set_xlim(0, duration)
        face_ax.set_ylabel("score" if trace.kind == "blendshapes" else "probability")
        face_ax.set_xlabel("time (s); lines above: window centres, below: video frames")
        face_ax.grid(alpha=0.3)
        face_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title=trace.kind, title_fontsize=8)
        ax.tick_params(labelbottom=False)

    if thumbs:
        strip = fig.add_subplot(grid[0], sharex=ax)
        strip.set_ylim(0, 1)
        strip.axis("off")
        # Each thumbnail is centred on its time, with a width that leaves gaps between them.
        width = duration / max(len(thumbs) * 1.3, 4)
        for thumb in thumbs:
            x0 = min(max(thumb.time_s - width / 2, 0.0), max(duration - width, 0.0))
            strip.imshow(thumb.image, extent=(x0, x0 + width, 0.0, 1.0), aspect="auto", interpolation="bilinear")
            ax.axvline(thumb.time_s, color="0.6", lw=0.6, ls=":")
        strip.set_xlim(0, duration)
        top = strip
    else:
        top = ax
    p = prediction.probabilities.get(prediction.label or "", float("nan"))
    header = title or f"{Path(prediction.path).name}: {prediction.label} ({p:.2f})"
    header += f"  [{'+'.join(prediction.modalities)}]"
    top.set_title(header, fontsize=10)
    return fig
