"""DataFrame / path -> matplotlib figure. Every figure names its model, data and settings."""
from __future__ import annotations

from ..studies.path_study import entry_matrix


def top1_vs_macs(table, title: str = ""):
    """Top-1 (no retraining and head re-fit) against MACs per image, dense point marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pruned = table[table["budget"] != "dense"]
    dense = table[table["budget"] == "dense"]
    gmacs = pruned["macs"] / 1e9
    ax.plot(gmacs, pruned["top1_head_refit"], "o-", label="SPP, head re-fit")
    ax.plot(gmacs, pruned["top1_no_retrain"], "s--", label="SPP, no retraining")
    if len(dense):
        ax.axhline(float(dense["top1_no_retrain"].iloc[0]), color="grey", lw=1, ls=":", label="dense")
    for _, r in pruned.iterrows():
        ax.annotate(f"{r['fraction']:.2f}", (r["macs"] / 1e9, r["top1_head_refit"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GMACs per image (multiply-adds, attention included)")
    ax.set_ylabel("top-1")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def support_vs_step(path, title: str = ""):
    """Support size of Gamma per pool against the search step (the inverse scale space)."""
    import matplotlib.pyplot as plt

    df = path.support_curve("pool")
    sizes = {pool: sum(g.size for g in path.groups if g.pool == pool) for pool in df["pool"].unique()}
    fig, ax = plt.subplots(figsize=(6, 4))
    for pool, part in df.groupby("pool"):
        ax.plot(part["step"], part["support"] / sizes[pool], label=f"{pool} ({sizes[pool]} entries)")
    ax.set_xlabel("search step")
    ax.set_ylabel("fraction of entries in supp(Gamma)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def method_label(method: str, rows) -> str:
    """A method's legend label: its name, with the search form when ``rows`` (its rows of a table) name one
    other than the paper's (e.g. 'spp (adam form, a variant)')."""
    forms = [f for f in (rows["form"].dropna().unique() if "form" in rows else []) if f and f != "paper"]
    return f"{method} ({', '.join(forms)} form, a variant)" if forms else method


STAGE_LABELS = {"top1_no_retrain": "no retraining", "top1_restandardised": "no retraining, re-standardised",
                "top1_head_refit": "head re-fit", "top1_finetuned": "fine-tuned"}


def methods_vs_macs(summary, title: str = "", dense=None):
    """One panel per top-1 read-out in ``summary`` (no retraining, re-standardised, head re-fit, fine-tuned):
    mean top-1 per method against the achieved MACs fraction (error bars: sd over seeds where there are several)."""
    import matplotlib.pyplot as plt

    cols = [(c, label) for c, label in STAGE_LABELS.items() if c in summary]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.4 * len(cols), 4), sharex=True, squeeze=False)
    axes = axes[0]
    pruned = summary[summary["method"] != "dense"]
    for ax, (col, label) in zip(axes, cols):
        for method, part in pruned.groupby("method", sort=False):
            part = part.sort_values("macs_fraction")
            err = part.get(col + "_sd")
            err = err.fillna(0.0) if err is not None else None
            ax.errorbar(part["macs_fraction"], part[col], yerr=err if err is not None and err.any() else None,
                        marker="o", ms=4, capsize=2, label=method_label(method, part))
        if dense is not None and col in dense:
            ax.axhline(float(dense[col]), color="grey", lw=1, ls=":", label="dense")
        ax.set_title(f"top-1, {label}", fontsize=9)
        ax.set_xlabel("MACs / dense MACs (measured)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (test split)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def support_per_layer(path, title: str = ""):
    """Fraction of each layer's entries in supp(Gamma) against the step, one panel per pool, one line per layer."""
    import matplotlib.pyplot as plt

    df = path.support_curve("group")
    groups = {g.name: g for g in path.groups}
    pools = sorted({g.pool for g in path.groups})
    fig, axes = plt.subplots(1, len(pools), figsize=(4.2 * len(pools), 3.6), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    n_layers = max(g.layer for g in path.groups) + 1
    for ax, pool in zip(axes[0], pools):
        for name, part in df.groupby("group", sort=False):
            g = groups.get(name)
            if g is None or g.pool != pool:
                continue
            ax.plot(part["step"], part["support"] / g.size, color=cmap(g.layer / max(1, n_layers - 1)), lw=1)
        ax.set_title(f"{pool}", fontsize=9)
        ax.set_xlabel("search step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of the layer's entries in supp(Gamma)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_layers - 1))
    fig.colorbar(sm, ax=axes[0].tolist(), label="layer")
    fig.suptitle(title, fontsize=9)
    return fig


def entry_order_heatmap(path, title: str = ""):
    """Per pool, a (layer x entry) map of entry steps, each layer's entries sorted by entry step; never-entered
    entries in grey, padding (layers with fewer entries) white."""
    import matplotlib.pyplot as plt
    import numpy as np


    pools = sorted({g.pool for g in path.groups})
    steps = max(1, int(path.config.get("steps", 1)))
    fig, axes = plt.subplots(len(pools), 1, figsize=(8, 1.2 + 1.6 * len(pools)), squeeze=False)
    cmap = plt.get_cmap("magma_r").copy()
    cmap.set_bad("0.75")  # never entered
    cmap.set_under("white")  # padding
    im = None
    for ax, pool in zip(axes[:, 0], pools):
        mat, layers = entry_matrix(path, pool)
        arr = mat.numpy().astype(float)
        arr = np.ma.masked_where(arr == -1, arr)
        im = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=steps)
        ax.set_ylabel(f"{pool}\nlayer", fontsize=8)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers, fontsize=6)
        ax.set_xlabel("entries of the layer, sorted by entry step (grey: never entered)", fontsize=8)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="entry step")
    fig.suptitle(title, fontsize=9)
    return fig


def entry_time_histogram(path, title: str = ""):
    """Path health at a glance (docs/path_health.md): a histogram of the entries' entry times (one bin per
    step) with the search loss over the steps on a second axis, and the health verdict in the title."""
    import warnings

    import matplotlib.pyplot as plt
    import torch

    t = torch.cat([v for v in path.entry_time.values()])
    t = t[t >= 0]
    steps = int(path.config.get("steps") or (max(h["step"] for h in path.history) if path.history else 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(t.numpy(), bins=range(0, steps + 2), color="tab:blue", alpha=0.7)
    ax.set_xlabel("entry time (search step)")
    ax.set_ylabel("entries entering", color="tab:blue")
    loss = [(h["step"], h["loss"]) for h in path.history if "loss" in h]
    if loss:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in loss], [v for _, v in loss], color="tab:red", lw=1.2)
        ax2.set_ylabel("search loss", color="tab:red")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = path.diagnostics()
    if d.get("applicable"):
        verdict = "healthy" if d["healthy"] else "DEGENERATE: " + "; ".join(p.split(":")[0] for p in d["problems"])
        title = f"{title}\n{verdict}"
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
