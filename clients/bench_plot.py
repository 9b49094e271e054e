"""`--plot`: one PNG with the latency distributions and the run over time (matplotlib, Agg)."""
from __future__ import annotations

from clients.bench_metrics import concurrency_series, percentile, token_rate_series

NICE_BUCKETS = (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0)


def bucket_width(duration: float, target: int = 60) -> float:
    """A round bucket size giving about `target` buckets over `duration` s."""
    return next((b for b in NICE_BUCKETS if b * target >= duration), NICE_BUCKETS[-1])


def _distribution(ax, values_ms: list[float], title: str, color: str, counted: str) -> None:
    ax.set_xlabel("ms")
    if not values_ms:
        ax.set_title(title)
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    xs = sorted(values_ms)
    p50, p99 = percentile(xs, 50), percentile(xs, 99)
    ax.set_title(f"{title}: p50 {p50:.0f} ms, p99 {p99:.0f} ms (n={len(xs)})", fontsize=11)
    ax.hist(values_ms, bins=min(50, max(5, len(values_ms) // 2)), color=color, alpha=0.6)
    ax.set_ylabel(counted)
    cdf = ax.twinx()
    cdf.step([xs[0]] + xs, [0.0] + [(i + 1) / len(xs) for i in range(len(xs))],
             where="post", color="black", lw=1.2, label="CDF")
    cdf.set_ylim(0, 1.02)
    cdf.set_ylabel("fraction at or below (CDF)")
    ax.axvline(p50, color="black", ls="--", lw=1, label="p50")
    ax.axvline(p99, color="black", ls=":", lw=1, label="p99")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)


def plot_result(result, path: str) -> None:
    """Write the figure of a BenchResult to `path` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot, no global backend
    from matplotlib.figure import Figure

    ok = [r for r in result.requests if r.success]
    m, c = result.metrics, result.config
    fig = Figure(figsize=(15, 9), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3)
    rate = "inf" if c.request_rate == float("inf") else f"{c.request_rate:g}/s"
    fig.suptitle(f"kvserve bench: {result.model} @ {c.base_url}, {c.endpoint}, "
                 f"{m['completed']} ok / {m['failed']} failed, rate {rate}, "
                 f"max concurrency {c.max_concurrency or 'none'}", fontsize=12)
    _distribution(fig.add_subplot(grid[0, 0]), [r.ttft * 1000 for r in ok if r.ttft is not None],
                  "Time to first token", "tab:blue", "requests")
    _distribution(fig.add_subplot(grid[0, 1]), [x * 1000 for r in ok for x in r.itl],
                  "Inter-token latency", "tab:orange", "gaps between chunks")
    _distribution(fig.add_subplot(grid[0, 2]), [r.e2e * 1000 for r in ok if r.e2e is not None],
                  "End-to-end latency", "tab:green", "requests")

    duration = max(result.duration, 1e-6)
    width = bucket_width(duration)
    starts, rates = token_rate_series(ok, duration, width)
    ax = fig.add_subplot(grid[1, :2])
    ax.bar(starts, rates, width=width, align="edge", color="tab:purple", alpha=0.7)
    if m["output_throughput"] is not None:
        ax.axhline(m["output_throughput"], color="black", ls="--", lw=1,
                   label=f"mean {m['output_throughput']:.1f} tok/s")
        ax.legend(loc="upper right", fontsize=8)
    unit = "tokens" if m["token_counts_from_usage"] else "chunks (no usage from the server)"
    ax.set_title(f"Output throughput over time ({width:g} s buckets)")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(f"{unit} / s")
    ax.set_xlim(0, duration)

    ax = fig.add_subplot(grid[1, 2])
    times, levels = concurrency_series(result.requests)
    ax.step(times + [duration], levels + [levels[-1]], where="post", color="tab:red")
    ax.set_title(f"Requests in flight (peak {m['peak_concurrency']})")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests")
    ax.set_xlim(0, duration)
    ax.set_ylim(0, max(levels) + 1)
    fig.savefig(path, dpi=100)
