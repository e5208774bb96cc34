"""Environment throughput: symbol-steps/s of VecTradingCore at (E, S) = (16, 143) and (1, 10) including observation
writing, steps/s of one TradingEnvironment, peak memory; peers in the same run when installed: gym-anytrading's
StocksEnv and FinRL's StockTradingEnv (ticker-steps/s), with ratios.

    python benchmarks/bench_env.py --quick --json benchmarks/results/env.json

Actions are drawn uniformly from {0..6} beforehand (masked ones execute as HOLD, as in early training), so the
timing covers the env alone. Market: random arrays of the PreparedMarket shapes (the speed does not depend on the
values)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, peak_rss_mib, repeat_timed, summarize, write_json

import trading_env as te
from market_data import PreparedMarket, random_walk_market


def random_market(T: int, S: int, seed: int = 0) -> PreparedMarket:
    return random_walk_market(T, S, seed, splits={"train": (30, T)}, volume=(1e5, 1e6))


def bench_core(market, E: int, S: int, steps: int, repeats: int) -> dict:
    core = te.VecTradingCore(market, E, symbols=list(range(S)), seed=0)
    core.reset()
    actions = np.random.default_rng(1).integers(0, te.NUM_ACTIONS, (64, E, S))

    def run():
        for i in range(steps):
            core.step(actions[i & 63])

    times = repeat_timed(run, repeats)
    s = summarize(times)
    return {"E": E, "S": S, "steps": steps, **s, "symbol_steps_per_s": E * S * steps / s["median_s"]}


def bench_single(market, steps: int, repeats: int) -> dict:
    env = te.TradingEnvironment(market, symbol=0, seed=0)
    env.reset(seed=0)
    actions = np.random.default_rng(2).integers(0, te.NUM_ACTIONS, 4096).tolist()

    def run():
        for i in range(steps):
            _, _, term, trunc, _ = env.step(actions[i & 4095])
            if term or trunc:
                env.reset()

    s = summarize(repeat_timed(run, repeats))
    return {"steps": steps, **s, "steps_per_s": steps / s["median_s"]}


def bench_anytrading(market, steps: int, repeats: int) -> dict:
    try:
        import gym_anytrading  # noqa: F401
        import pandas as pd
        from gym_anytrading.envs import StocksEnv
    except ImportError as e:
        return {"status": f"not installed ({e.__class__.__name__})"}
    d = market.data
    T = d.close.shape[0]
    df = pd.DataFrame({"Open": d.open[:, 0], "High": d.high[:, 0], "Low": d.low[:, 0], "Close": d.close[:, 0],
                       "Volume": d.volume[:, 0]})  # fmt: skip
    env = StocksEnv(df=df, window_size=24, frame_bound=(24, T))
    env.reset(seed=0)
    actions = np.random.default_rng(3).integers(0, 2, 4096).tolist()

    def run():
        for i in range(steps):
            _, _, term, trunc, _ = env.step(actions[i & 4095])
            if term or trunc:
                env.reset()

    s = summarize(repeat_timed(run, repeats))
    return {"status": "ok", "steps": steps, **s, "ticker_steps_per_s": steps / s["median_s"]}


def bench_finrl() -> dict:
    try:
        from finrl.meta.env_stock_trading.env_stocktrading import StockTradingEnv  # noqa: F401
    except ImportError:
        return {"status": "not installed (finrl pulls heavy dependencies; not installed on this machine)"}
    return {"status": "installed but not measured by this script"}


CHILD = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import bench_env
market = bench_env.random_market(8000, 143)
print(json.dumps(bench_env.bench_core(market, 16, 143, 400, 3)["symbol_steps_per_s"]))
"""


def compare(other: str, rounds: int) -> dict:
    """VecTradingCore at (16, 143) in this checkout and in `other` (another checkout of the repo, e.g. a git worktree
    of an earlier commit), alternating, each run in a fresh process with one thread: medians and the paired ratios
    (this / other), which a noisy machine disturbs less than the medians."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"this": [], "other": []}
    for i in range(rounds):
        for name in ("this", "other") if i % 2 == 0 else ("other", "this"):
            root = str(ROOT) if name == "this" else str(Path(other).resolve())
            out = subprocess.run([sys.executable, "-c", CHILD, root], cwd=root, env=env, capture_output=True,
                                 text=True, check=True)  # fmt: skip
            runs[name].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"round {i + 1}: {name} {runs[name][-1]:,.0f} symbol-steps/s", flush=True)
    ratios = [a / b for a, b in zip(runs["this"], runs["other"], strict=True)]
    return {"benchmark": "env_compare", "other": other, "rounds": rounds, "runs": runs,
            "median_this": statistics.median(runs["this"]), "median_other": statistics.median(runs["other"]),
            "paired_ratios": ratios, "median_paired_ratio": statistics.median(ratios)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats (under a minute)")
    p.add_argument("--json", default=None, help="write the record to this path")
    p.add_argument("--compare", default=None, help="another checkout: the core's speed here against there, A/B")
    p.add_argument("--rounds", type=int, default=5, help="with --compare: alternations")
    args = p.parse_args()
    if args.compare:
        write_json(args.json, compare(args.compare, args.rounds))
        return
    steps_big, steps_small, steps_single, repeats = (100, 1000, 3000, 3) if args.quick else (400, 5000, 20000, 5)
    t0 = time.perf_counter()
    market = random_market(T=4000 if args.quick else 8000, S=143)
    big = bench_core(market, 16, 143, steps_big, repeats)
    small = bench_core(market, 1, 10, steps_small, repeats)
    single = bench_single(market, steps_single, repeats)
    anytrading = bench_anytrading(market, steps_single, repeats)
    finrl = bench_finrl()
    record = {
        "benchmark": "env",
        "quick": args.quick,
        "core_symbol_steps_per_s": big["symbol_steps_per_s"],
        "core_small_symbol_steps_per_s": small["symbol_steps_per_s"],
        "single_env_steps_per_s": single["steps_per_s"],
        "core_16x143": big,
        "core_1x10": small,
        "single_env": single,
        "peer_gym_anytrading_stocks_env": anytrading,
        "peer_finrl_stock_trading_env": finrl,
        "peak_rss_mib": peak_rss_mib(),
        "goals": {"core_symbol_steps_per_s": 1_000_000, "single_env_steps_per_s": 20_000},
        "wall_s": time.perf_counter() - t0,
    }
    if anytrading.get("status") == "ok":
        record["ratio_core_vs_anytrading"] = big["symbol_steps_per_s"] / anytrading["ticker_steps_per_s"]
        record["ratio_single_vs_anytrading"] = single["steps_per_s"] / anytrading["ticker_steps_per_s"]
    write_json(args.json, record)


if __name__ == "__main__":
    sys.exit(main())
