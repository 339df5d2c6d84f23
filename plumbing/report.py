"""What a run shows: progress, the metric lines, the cost table and stage2.png."""
import io
import os
import sys

from tqdm import tqdm

from plumbing.files import save_bytes

LINE_EVERY = 30  # seconds between progress lines when the output is a file, not a terminal


class _Lines(tqdm):
    """tqdm for a log file: a plain progress line now and then (every LINE_EVERY seconds, and at the
    end of a bar that stays), instead of a carriage-return redraw every tenth of a second."""

    def __init__(self, *args, **kwargs):
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0), LINE_EVERY)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg is not None or not self.n or self.n == getattr(self, "shown", 0):
            return False  # not the empty bar at the start, no clearing, no line twice
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self.shown = self.n
        return True

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # a line only when display() is due

    def close(self):
        if self.leave and not getattr(self, "disable", True):
            self.display()  # the final count, on a line of its own
        self.leave = False  # no carriage return or newline of tqdm's own
        super().close()


def progress(*args, **kwargs):
    """A progress bar (tqdm's arguments): redrawn in place on a terminal, plain lines in a file."""
    return (tqdm if sys.stderr.isatty() else _Lines)(*args, **kwargs)


def quiet_library_bars():
    """Off: the loading and saving bars of transformers and the hub, when the output is a file."""
    if not sys.stderr.isatty():
        import huggingface_hub.utils
        import transformers
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def print_cost(cost):
    """One line per phase of cost_summary."""
    for name, c in cost.items():
        extra = "".join(f"  {c[k]:,} {k} ({c[k + '_s']:,} /s)" for k in ("samples", "tokens")
                        if c.get(k) and c.get(k + "_s"))
        peak = f"  peak {c['peak_gib']} GiB" if "peak_gib" in c else ""
        print(f"{name:>16}  {c['count']:>4} x  {c['s']:>9,.1f} s{extra}{peak}")


def plot_stage2(out, records, labels):
    """stage2.png, for a reader of the paper: per GRPO step the total reward and each reward part that counts
    (labels: {term: its name}; dropped terms are left out), the KL, the policy's token entropy and the CoT
    length (cf. the paper's Fig. 4), then the valid NDCG@10 of each evaluation with the step kept in best/."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise SystemExit("error: matplotlib is missing; pip install -r requirements.txt") from None
    recs = [r for r in records if r["stage"] == 2]
    steps, evals = [r for r in recs if "reward" in r], [r for r in recs if "valid_ndcg@10" in r]
    curves = [("reward", "total reward r (eq. 7)", "reward")] + [(k, v, "reward") for k, v in labels.items()] + [
        ("kl", "KL to the reference (k3)", "nats per token"), ("entropy", "policy's token entropy", "nats"),
        ("cot_len", "CoT length", "tokens")]
    cols = (len(curves) + 2) // 2
    fig, axes = plt.subplots(2, cols, figsize=(3.4 * cols, 6.2))
    w = max(1, len(steps) // 6)  # a step's values are noisy (a few prompts): the trend is their running mean
    for i, (ax, (key, title, unit)) in enumerate(zip(axes.flat, curves)):
        x, y = [r["step"] for r in steps], [r[key] for r in steps]
        ax.plot(x, y, marker=".", alpha=0.35 if w > 1 else 1.0, label="each step")
        if w > 1:
            ax.plot(x, [sum(y[max(0, j - w + 1):j + 1]) / len(y[max(0, j - w + 1):j + 1]) for j in range(len(y))],
                    color="tab:blue", linewidth=2, label=f"mean of the last {w}")
            if i == 0:
                ax.legend(loc="best", fontsize="small")
        ax.set(title=title, xlabel="GRPO step", ylabel=unit)
    ax = axes.flat[len(curves)]
    ax.plot([r["step"] for r in evals], [r["valid_ndcg@10"] for r in evals], marker="o")
    if evals:
        kept = evals[-1]["best_step"]
        value = next(r["valid_ndcg@10"] for r in evals if r["step"] == kept)
        ax.plot([kept], [value], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"kept: step {kept}")
        ax.legend(loc="best")
    ax.set(title="valid NDCG@10 (the subset)", xlabel="GRPO step", ylabel="NDCG@10")
    for ax in axes.flat:
        ax.ticklabel_format(useOffset=False, axis="y")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(curves) + 1:]:
        ax.axis("off")
    fig.suptitle("Stage II: GRPO on the frozen Rechead's rewards")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    plt.close(fig)
    save_bytes(os.path.join(out, "stage2.png"), buf.getvalue())


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
