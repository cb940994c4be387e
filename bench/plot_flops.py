"""Figure 1's x-axis on one implementation: GMACs per forward pass and per training step of the DiT presets,
on 32x128 FlatDINO latents vs 256x768 DINOv2 grids, from `flatdino flops --json` (meta-device counts).

    .venv/bin/python bench/plot_flops.py [--out bench/flops.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("flops.png"))
    args = ap.parse_args()
    report = json.loads(subprocess.run([sys.executable, "-m", "pipeline", "flops", "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    rows = report["rows"]
    names = [r["preset"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(names))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], [r["flat"]["gmacs"] for r in rows], 0.4, label="FlatDINO 32x128")
    ax.bar([i + 0.2 for i in x], [r["grid"]["gmacs"] for r in rows], 0.4, label="DINOv2 grid 256x768")
    for i, r in enumerate(rows):
        ax.text(i, r["grid"]["gmacs"] * 1.05, f"{r['forward_ratio']:.1f}x", ha="center", fontsize=9)
    ax.set(title="DiT forward pass", ylabel="GMACs per image", xticks=list(x), xticklabels=names, yscale="log")
    ax.legend()
    ax = axes[1]
    ax.bar([i - 0.2 for i in x], [r["step_flat_gmacs"] for r in rows], 0.4, label="FlatDINO (DiT x3 + DINOv2 + enc.)")
    ax.bar([i + 0.2 for i in x], [r["step_grid_gmacs"] for r in rows], 0.4, label="DINOv2 grid (DiT x3 + DINOv2)")
    for i, r in enumerate(rows):
        ax.text(i, max(r["step_grid_gmacs"], r["step_flat_gmacs"]) * 1.05, f"{r['step_ratio']:.2f}x", ha="center",
                fontsize=9)
    ax.set(title="per training step, latents computed online", ylabel="GMACs per image", xticks=list(x),
           xticklabels=names, yscale="log")
    ax.legend(fontsize=8)
    fig.suptitle("GMACs (multiply-adds, DiT convention), counted on the meta device by torch's FlopCounterMode")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    for r in rows:
        print(f"{r['preset']:3s} forward {r['flat']['gmacs']:7.2f} vs {r['grid']['gmacs']:7.2f} GMACs ({r['forward_ratio']:.2f}x)"
              f" | train step {r['step_flat_gmacs']:7.1f} vs {r['step_grid_gmacs']:7.1f} ({r['step_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
