"""Does the symbol agent learn a real edge, honestly measured? ppo_symbol_agent.py with its default settings (the
anti-collapse stack on) on synthetic markets with a planted signal of 0.5 and 0.3 and on a placebo market (0: no
edge), 10 years each (test split ~2,600 bars), several seeds per market (the market's seed is the training seed),
beside every baseline of the final backtest and the rule ceiling.

    python benchmarks/bench_learning.py --signal 0.3 --seed 1        # one piece: writes results/learning/0.3_seed1.json
    python benchmarks/bench_learning.py --all --jobs 2               # every missing piece, two processes at a time
    python benchmarks/bench_learning.py --summary                    # learning.json, learning.png, the table

A piece is one training run in its own process that writes its own JSON when it finishes, so that an interrupted
benchmark loses nothing; --summary assembles the table from whatever pieces exist. Per market: the mean test Sharpe
of the agent (argmax) with a 95% interval (Student t over seeds), the seeds above 1.0, the mean of every baseline,
the rule ceiling (the best one-feature rule fitted on the train split) and the agent's share of it, and for the
placebo the largest margin of a seed over its best baseline in standard errors. Sharpe ratios come from daily
returns (backtest.performance_metrics) with a Newey-West standard error; each piece stores the daily returns of the
agent and of every baseline, so that a change of metric re-scores the pieces without retraining.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, machine_info, write_json

SCRIPT = ROOT / "ppo_symbol_agent.py"
RESULTS = ROOT / "benchmarks" / "results"
PIECES = RESULTS / "learning"
SIGNALS = (0.5, 0.3, 0.0)
SEEDS = (1, 2, 3, 4, 5)
YEARS = 10.0
BASELINES = (
    "always_hold",
    "random",
    "benchmark_bh",
    "equal_weight_bh",
    "benchmark_bh_matched",
    "equal_weight_bh_matched",
)


def piece_path(signal: float, seed: int) -> Path:
    return PIECES / f"{signal:g}_seed{seed}.json"


def run_piece(signal: float, seed: int, extra: list[str]) -> Path:
    """Train one seed on one market and write its JSON; returns the JSON's path."""
    flags = ["--data.signal-strength", str(signal), "--data.years", str(YEARS), "--data.seed", str(seed)]
    flags += ["--seed", str(seed), "--exp-name", f"learning_{signal:g}", *extra]
    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        t0 = time.time()
        cmd = [sys.executable, str(SCRIPT), *flags, "--run-dir", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            )
        (run,) = Path(tmp).iterdir()
        summary = json.loads((run / "summary.json").read_text())
        daily = pd.read_parquet(run / "test_daily_returns.parquet")  # every strategy's daily returns: re-scorable
    record = {
        "benchmark": "learning_piece",
        "signal": signal,
        "seed": seed,
        "years": YEARS,
        "command": f"python ppo_symbol_agent.py {' '.join(flags)}",
        "wall_s": time.time() - t0,
        "test": summary["backtest"],
        "val": summary["val"],
        "rule": summary["rule"],
        "deciles": summary["deciles"],
        "telemetry": summary["telemetry"],
        "global_step": summary["global_step"],
        "val_sharpes": summary["val_sharpes"],
        "daily_returns": {"dates": [str(d.date()) for d in daily.index]} | {k: daily[k].tolist() for k in daily},
        "machine": machine_info(),
    }
    path = piece_path(signal, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    agent, ceiling = record["test"]["agent"]["sharpe"], record["test"]["rule_ceiling"]["sharpe"]
    print(f"signal {signal:g} seed {seed}: test Sharpe {agent:.2f} (rule ceiling {ceiling:.2f})", flush=True)
    return path


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and its 95% interval (Student t with n - 1 degrees of freedom)."""
    from scipy import stats

    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half


def summarize(pieces: list[dict]) -> dict:
    """Per market: the agent's mean test Sharpe and 95% interval, seeds above 1, baselines, ceiling, placebo margin."""
    markets = {}
    for signal in sorted({p["signal"] for p in pieces}, reverse=True):
        rows = sorted((p for p in pieces if p["signal"] == signal), key=lambda p: p["seed"])
        sharpe = lambda name, rows=rows: np.array([r["test"][name]["sharpe"] for r in rows])  # noqa: E731
        agent, sampled, ceiling = sharpe("agent"), sharpe("agent_sampled"), sharpe("rule_ceiling")
        mean, lo, hi = t_interval(agent)
        best = np.max([sharpe(b) for b in BASELINES], axis=0)  # each seed's best baseline
        se = np.array([r["test"]["agent"]["sharpe_se"] for r in rows])
        markets[f"{signal:g}"] = {
            "signal": signal,
            "seeds": [r["seed"] for r in rows],
            "agent_sharpe": agent.tolist(),
            "agent_mean": mean,
            "agent_ci95": [lo, hi],
            "agent_sampled_mean": float(sampled.mean()),
            "seeds_above_1": int((agent > 1.0).sum()),
            "ceiling_sharpe": ceiling.tolist(),
            "ceiling_mean": float(ceiling.mean()),
            # a share of the placebo's ceiling (noise around 0) means nothing
            "share_of_ceiling": mean / float(ceiling.mean()) if signal > 0 and ceiling.mean() > 0 else None,
            "baselines_mean": {b: float(sharpe(b).mean()) for b in BASELINES},
            "best_baseline_sharpe": best.tolist(),
            "margin_over_best_baseline_se": ((agent - best) / se).tolist(),
            "agent_sharpe_se_mean": float(se.mean()),
            "agent_psr": [r["test"]["agent"].get("psr") for r in rows],
            "agent_dsr": [r["test"]["agent"].get("dsr") for r in rows],
            "agent_sharpe_bar": [r["test"]["agent"].get("sharpe_bar") for r in rows],
            "ceiling_sharpe_bar": [r["test"]["rule_ceiling"].get("sharpe_bar") for r in rows],
            "exposure_mean": float(np.mean([r["test"]["agent"]["exposure"] for r in rows])),
            "trade_rate_mean": float(np.mean([r["test"]["agent"]["trade_rate"] for r in rows])),
            "test_bars": rows[0]["test"]["agent"]["bars"],
            "wall_s_mean": float(np.mean([r["wall_s"] for r in rows])),
        }
    return markets


def table(markets: dict) -> str:
    head = (
        "| signal | seeds | agent test Sharpe: mean [95% CI] | seeds > 1 | sampled | rule ceiling | agent / ceiling | "
    )
    head += " | ".join(BASELINES) + " | exposure | trade rate |"
    lines = [head, "|" + "---|" * (10 + len(BASELINES))]
    for m in markets.values():
        share = "-" if m["share_of_ceiling"] is None else f"{m['share_of_ceiling']:.0%}"
        base = " | ".join(f"{m['baselines_mean'][b]:.2f}" for b in BASELINES)
        lines.append(
            f"| {m['signal']:g} | {len(m['seeds'])} | {m['agent_mean']:.2f} [{m['agent_ci95'][0]:.2f}, "
            f"{m['agent_ci95'][1]:.2f}] | {m['seeds_above_1']} | {m['agent_sampled_mean']:.2f} | "
            f"{m['ceiling_mean']:.2f} | {share} | {base} | {m['exposure_mean']:.3f} | {m['trade_rate_mean']:.3f} |"
        )
    return "\n".join(lines)


def plot(markets: dict, path: Path) -> None:
    """The agent's test Sharpe per seed beside its mean interval, the rule ceiling and the baselines, per market."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, m in enumerate(markets.values()):
        x = np.full(len(m["agent_sharpe"]), i) + np.linspace(-0.12, 0.12, len(m["agent_sharpe"]))
        ax.scatter(x, m["agent_sharpe"], color="tab:blue", zorder=3, label="agent (seeds)" if i == 0 else None)
        lo, hi = m["agent_ci95"]
        ax.errorbar(i + 0.25, m["agent_mean"], yerr=[[m["agent_mean"] - lo], [hi - m["agent_mean"]]], fmt="o",
                    color="navy", capsize=4, label="agent mean, 95% CI" if i == 0 else None)  # fmt: skip
        ax.scatter(i - 0.3, m["ceiling_mean"], marker="_", s=400, color="tab:green",
                   label="rule ceiling (mean)" if i == 0 else None)  # fmt: skip
        best = max(m["baselines_mean"].values())
        ax.scatter(i - 0.3, best, marker="_", s=400, color="tab:red", label="best baseline (mean)" if i == 0 else None)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(markets)), [f"signal {m['signal']:g}" + (" (placebo)" if m["signal"] == 0 else "")
                                        for m in markets.values()])  # fmt: skip
    ax.set_ylabel("test-split Sharpe (annualised)")
    ax.set_title("ppo_symbol_agent.py, default settings, 10-year synthetic markets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--signal", type=float, help="one piece: the market's planted signal strength")
    p.add_argument("--seed", type=int, help="one piece: the seed (market and training)")
    p.add_argument("--all", action="store_true", help="run every missing piece of --signals x --seeds")
    p.add_argument("--signals", type=float, nargs="+", default=list(SIGNALS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--jobs", type=int, default=2, help="pieces run at once (one process each)")
    p.add_argument("--summary", action="store_true", help="assemble learning.json and learning.png from the pieces")
    p.add_argument("--redo", action="store_true", help="rerun pieces that already have a JSON")
    p.add_argument("train_args", nargs="*", help="extra arguments for ppo_symbol_agent.py (after --)")
    args = p.parse_args()
    if args.signal is not None or args.seed is not None:
        if args.signal is None or args.seed is None:
            p.error("a piece needs both --signal and --seed")
        run_piece(args.signal, args.seed, args.train_args)
    if args.all:
        todo = [(s, k) for s in args.signals for k in args.seeds if args.redo or not piece_path(s, k).exists()]
        print(f"{len(todo)} pieces to run, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_piece, s, k, args.train_args) for s, k in todo]:
                future.result()
    if args.summary:
        pieces = [json.loads(f.read_text()) for f in sorted(PIECES.glob("*.json"))]
        old = [f"{q['signal']:g}_seed{q['seed']}" for q in pieces if "daily_returns" not in q]
        if old:  # measured before Sharpe came from daily returns: not comparable, rerun them (--redo)
            print(f"skipping {len(old)} pieces without daily returns (per-bar Sharpe; rerun with --redo): {old}")
        pieces = [q for q in pieces if "daily_returns" in q]
        if not pieces:
            p.error(f"no pieces under {PIECES}: run --signal/--seed or --all first")
        markets = summarize(pieces)
        plot(markets, RESULTS / "learning.png")
        record = {"benchmark": "learning", "markets": markets, "table": table(markets),
                  "pieces": [str(piece_path(q["signal"], q["seed"]).relative_to(ROOT)) for q in pieces]}  # fmt: skip
        write_json(RESULTS / "learning.json", record)
        print(record["table"])


if __name__ == "__main__":
    main()
