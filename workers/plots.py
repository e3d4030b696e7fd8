"""The figures gelato draws: pretraining curves, a 2-D PCA of features, a confusion matrix.

Each returns PNG bytes (or None when there is nothing to draw) for the caller to write into the run
through fsspec: ``plots/pretrain.png`` when pretraining ends (``workers/pretrain/export.py``), the
evaluation's ``plots/*.png`` (``workers/evaluate/report.py``). Drawn with matplotlib's Agg canvas:
no pyplot, no display, safe in threads.
"""
from __future__ import annotations

import io
from typing import Optional

import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _figure(w: float = 6.0, h: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def curve_plot(rows: list[dict], key: str, title: str, ylabel: str) -> Optional[bytes]:
    pts = [(r["epoch"], r[key]) for r in rows if key in r and "epoch" in r]
    if not pts:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, markersize=3)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return _png(fig)


def pretrain_figure(rows: list[dict], title: str) -> Optional[bytes]:
    """``RUN/plots/pretrain.png``, drawn when pretraining ends: loss, the online kNN curve, the
    learning rate (and the EMA momentum, where the objective has one) and the throughput, per step,
    from the rows of ``metrics.jsonl``. Dashed lines mark where the run resumed from a checkpoint."""
    pts = [r for r in rows if "loss" in r and "step" in r]
    if not pts:
        return None
    steps = [r["step"] for r in pts]
    resumed = [r["step"] for r in rows if r.get("event") == "resumed"]
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2)

    def panel(ax, x, y, ylabel, **kw):
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, **kw)
        for s in resumed:
            ax.axvline(s, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)

    panel(axes[0, 0], steps, [r["loss"] for r in pts], "loss")
    axes[0, 0].set_title("loss" + (" (dashed: resumed)" if resumed else ""))
    knn = [r for r in pts if "knn_top1" in r]
    if knn:
        panel(axes[0, 1], [r["step"] for r in knn], [100 * r["knn_top1"] for r in knn], "top-1 (%)")
        axes[0, 1].set_title(f"online kNN on val: {100 * knn[-1]['knn_top1']:.1f} % at the end")
    else:
        axes[0, 1].set_axis_off()
        axes[0, 1].text(0.5, 0.5, "no online kNN (knn_monitor off, or no labelled val split)",
                        ha="center", va="center", fontsize=9)
    panel(axes[1, 0], steps, [r["lr"] for r in pts], "learning rate", color="C0")
    axes[1, 0].set_title("learning rate" + (" and momentum" if any("momentum" in r for r in pts) else ""))
    mom = [r for r in pts if "momentum" in r]
    if mom:
        twin = axes[1, 0].twinx()
        twin.plot([r["step"] for r in mom], [r["momentum"] for r in mom], color="C1")
        twin.set_ylabel("EMA momentum", color="C1")
    rate = [r for r in pts if "samples_per_s" in r]
    panel(axes[1, 1], [r["step"] for r in rate], [r["samples_per_s"] for r in rate], "samples/s, all workers")
    if rate:
        med = sorted(r["samples_per_s"] for r in rate)[len(rate) // 2]
        axes[1, 1].set_title(f"throughput: median {med:,.0f} samples/s")
        axes[1, 1].set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """First two principal components (SVD of the centred features; signs fixed). Shape: (N, D) → (N, 2)."""
    xc = x.double() - x.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:2].T                                                          # (D, 2)
    v = v * torch.sign(v[v.abs().argmax(dim=0), torch.arange(v.shape[1])])  # largest loading positive
    return (xc @ v).float()


def embedding_plot(feats: torch.Tensor, labels: Optional[torch.Tensor], classes: list[str], title: str) -> bytes:
    xy = pca_2d(feats)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    if labels is None or not classes:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
    else:
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for c, name in enumerate(classes):
            m = labels == c
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.7, color=cmap(c % cmap.N), label=name)
        if len(classes) <= 20:
            ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set(xlabel="PC 1", ylabel="PC 2", title=title)
    return _png(fig)


def confusion_plot(confusion: list[list[int]], classes: list[str], title: str) -> bytes:
    cm = torch.tensor(confusion, dtype=torch.float64)
    norm = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig = _figure(max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    return _png(fig)

