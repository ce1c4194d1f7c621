"""Needle heatmaps (depth x context length, one PNG per method, k and dense-layer setting; seeds
averaged). Needs matplotlib."""
from __future__ import annotations

from pathlib import Path


def heatmaps(heat: list, out_dir: str) -> list:
    """Writes one PNG per (method, k, dense layers, task) from the harness's heatmap records;
    returns paths. The file name names the dense layers where a method ran with several."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("heatmaps: matplotlib is not installed (pip install matplotlib); skipped")
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups, settings = {}, {}
    for r in heat:
        dense = r.get("dense_layers")
        groups.setdefault((r["method"], r["k"], dense, r["task"]), []).append(r)
        settings.setdefault(r["method"], set()).add(dense)

    def cell(rows, d, n):
        vals = [r["accuracy"] for r in rows if r["depth"] == d and r["context_len"] == n]
        return sum(vals) / len(vals) if vals else float("nan")

    paths = []
    for (method, k, dense, task), rows in groups.items():
        depths = sorted({r["depth"] for r in rows})
        lengths = sorted({r["context_len"] for r in rows})
        grid = [[cell(rows, d, n) for n in lengths] for d in depths]
        several = len(settings[method]) > 1
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task}: {method}" + (f" k={k}" if k else "") +
                     (f" dense={dense}" if several else ""), fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        path = out / (f"needle_{task}_{method}{'_k' + str(k) if k else ''}"
                      f"{'_dl' + str(dense) if several else ''}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths
