"""What a run shows: the metric lines, the cost table and stage2.png."""
import io
import os

from plumbing.files import save_bytes


def print_cost(cost):
    """One line per phase of cost_summary."""
    for name, c in cost.items():
        extra = "".join(f"  {c[k]:,} {k} ({c[k + '_s']:,} /s)" for k in ("samples", "tokens")
                        if c.get(k) and c.get(k + "_s"))
        peak = f"  peak {c['peak_gib']} GiB" if "peak_gib" in c else ""
        print(f"{name:>16}  {c['count']:>4} x  {c['s']:>9,.1f} s{extra}{peak}")


def plot_curves(path, recs, keys, curve=None):
    """One panel per key over the records' steps, plus an optional (title, steps, values) curve, into path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: matplotlib is missing; pip install -r requirements.txt") from None
    panels = list(keys) + ([curve[0]] if curve else [])
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(3.6 * ((len(panels) + 1) // 2), 6))
    for ax, k in zip(axes.flat, keys):
        ax.plot([r["step"] for r in recs], [r[k] for r in recs])
        ax.set_title(k)
        ax.set_xlabel("step")
    if curve:
        ax = axes.flat[len(keys)]
        ax.plot(curve[1], curve[2], marker="o")
        ax.set_title(curve[0])
        ax.set_xlabel("step")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    plt.close(fig)
    save_bytes(path, buf.getvalue())


def plot_stage2(out, records, terms):
    """Reward parts, KL, entropy, CoT length per step (cf. the paper's Fig. 4) and the valid curve: stage2.png."""
    recs = [r for r in records if r["stage"] == 2]
    evals = [r for r in recs if "valid_ndcg@10" in r]
    plot_curves(os.path.join(out, "stage2.png"), [r for r in recs if "reward" in r],
                ("reward", *terms, "kl", "entropy", "cot_len"),
                ("valid ndcg@10", [r["step"] for r in evals], [r["valid_ndcg@10"] for r in evals]))


def print_metrics(metrics, keys=("hr@10", "ndcg@10", "hr@20", "parse_rate")):
    """One line per (method, split) of metrics.json, then one per phase of its cost."""
    for name, m in metrics.items():
        if name == "cost":
            continue
        for split, v in m.items():
            if isinstance(v, dict):
                print(f"{name:>10} {split:>5}  " + "  ".join(f"{k}={v[k]:.4f}" for k in keys if v.get(k) is not None))
    if metrics.get("cost"):
        print('cost (metrics.json "cost"; a line per step and phase in log.jsonl):')
        print_cost(metrics["cost"])
