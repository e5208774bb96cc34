"""mappo_master.py: training speed at S = 10 and S = 143 symbols, and (--go) whether the master adds skill.

Runs the script itself (a subprocess, periodic evaluation off, no supervised signal fit) for a few iterations at each
universe size and reads back what it logged: `charts/SPS` (symbol-steps per second, the same unit as
ppo_symbol_agent.py's) after the first iteration, which pays one-off warm-up costs, master decisions per second,
and the rollout / update split from `perf/*_seconds`. The market preparation and the final test backtest are outside
the timed loop.

    python benchmarks/bench_mappo.py --quick --json benchmarks/results/mappo_quick.json
    python benchmarks/bench_mappo.py --json benchmarks/results/mappo.json
    python benchmarks/bench_mappo.py --go --jobs 2          # pieces under results/mappo_go/, then mappo_go.json
    python benchmarks/bench_mappo.py --by-regime            # where the symbol level earns: mappo_by_regime.json

--go: per seed and per market (the regime market, whose downturns are announced by a dispersing cross-section,
--data.regime-foresight 0.5, and its placebo without warning, 0), symbol agents trained by ppo_symbol_agent.py
(default settings, GO_SYMBOL_STEPS symbol-steps, --save-model), then a master trained on top of them, frozen, by
mappo_master.py (GO_MASTER_STEPS symbol-steps). Each (market, seed) is one piece in its own processes that writes its
own JSON; the summary reads every piece: per seed the master, every baseline (neutral, exposure-matched neutral,
volatility target, defensive, buy-and-hold), exposure, drawdown and Sharpe, the go criterion and the directive
analysis against the hidden regime. 10-year markets: test splits of ~2,600 bars.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_info, write_json

SCRIPT = ROOT / "mappo_master.py"
GO_DIR = ROOT / "benchmarks" / "results" / "mappo_go"
GO_FORESIGHT = (0.5, 0.0)
GO_SEEDS = (1, 2, 3)
GO_SYMBOL_STEPS = 2_000_000
GO_MASTER_STEPS = 1_000_000
REGIMES = ("bull", "bear", "crisis", "warning")  # hidden labels, for the after-the-fact analysis
GO_NAMES = ("master", "neutral", "neutral_matched", "vol_target", "defensive", "benchmark_bh", "equal_weight_bh")


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def measure(num_symbols: int, num_envs: int, num_steps: int, iterations: int, threads: int, workdir: Path) -> dict:
    """Train for `iterations` iterations at this size; per-iteration figures exclude the first iteration."""
    batch = num_symbols * num_envs * num_steps
    flags = [
        "--data.num-symbols", str(num_symbols), "--data.years", "1.0", "--data.no-sl-signals", "--data.no-cache",
        "--num-envs", str(num_envs), "--num-steps", str(num_steps), "--total-timesteps", str(batch * iterations),
        "--eval-interval", "0", "--run-dir", str(workdir / f"S{num_symbols}"), "--no-cuda",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mappo_master.py failed at S={num_symbols}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run = next((workdir / f"S{num_symbols}").iterdir())
    s = scalars(run)
    rollout = [v for _, v in s["perf/rollout_seconds"]][1:]
    update = [v for _, v in s["perf/update_seconds"]][1:]
    per_iter = [r + u for r, u in zip(rollout, update, strict=True)]
    sps = batch / statistics.median(per_iter)
    decisions = num_envs * (num_steps // 7)
    summary = json.loads((run / "summary.json").read_text())
    return {
        "num_symbols": num_symbols,
        "num_envs": num_envs,
        "num_steps": num_steps,
        "iterations_timed": len(per_iter),
        "symbol_steps_per_iteration": batch,
        "train_symbol_steps_per_s": sps,
        "master_decisions_per_s": decisions / statistics.median(per_iter),
        "rollout_seconds_median": statistics.median(rollout),
        "update_seconds_median": statistics.median(update),
        "script_sps_whole_run": summary["sps"],
        "encoder": summary["encoder"],
        "torch_threads": threads,
    }


def go_piece(foresight: float, seed: int) -> Path:
    """Symbol agents, then a master on top of them, on one market and seed; writes the piece's JSON."""
    data = ["--data.years", "10", "--data.regime-foresight", str(foresight), "--data.seed", str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="bench_mappo_go_") as tmp:
        steps = [
            [ROOT / "ppo_symbol_agent.py", *data, "--seed", str(seed), "--total-timesteps", str(GO_SYMBOL_STEPS),
             "--save-model", "--no-stress", "--run-dir", f"{tmp}/symbols"],
            [SCRIPT, *data, "--seed", str(seed), "--total-timesteps", str(GO_MASTER_STEPS), "--freeze-symbols",
             "--no-stress", "--run-dir", f"{tmp}/master"],
        ]  # fmt: skip
        for i, cmd in enumerate(steps):
            if i == 1:
                cmd += ["--symbol-checkpoint", str(next(Path(tmp, "symbols").iterdir()) / "checkpoint.pt")]
            proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        symbols = json.loads(next(Path(tmp, "symbols").iterdir()).joinpath("summary.json").read_text())
        master = json.loads(next(Path(tmp, "master").iterdir()).joinpath("summary.json").read_text())
    record = {
        "benchmark": "mappo_go_piece",
        "foresight": foresight,
        "seed": seed,
        "commands": [f"python ppo_symbol_agent.py {' '.join(map(str, steps[0][1:-2]))}",
                     f"python mappo_master.py {' '.join(map(str, steps[1][1:-4]))} --symbol-checkpoint <that run>"],
        "symbol_agents_test": symbols["backtest"]["agent"],
        "backtest": {k: master["backtest"][k] for k in GO_NAMES},
        "go_criterion": master["go_criterion"],
        "directive_analysis": master["directive_analysis"],
        "machine": machine_info(),
    }  # fmt: skip
    path = GO_DIR / f"{foresight:g}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    go = record["go_criterion"]
    print(f"foresight {foresight:g} seed {seed}: go {'passed' if go['passed'] else 'missed'} (drawdown cut vs matched "
          f"{go['drawdown_cut_vs_matched_neutral']:.1%}, Sharpe {go['sharpe_master']:.2f} vs matched "
          f"{go['sharpe_matched_neutral']:.2f}, vol target {go['sharpe_vol_target']:.2f})", flush=True)  # fmt: skip
    return path


def go_table(pieces: list[dict]) -> str:
    """One row per piece: each strategy's test Sharpe / max drawdown / exposure, the go criterion, whether the master
    also beats the fixed defensive directive, and its mean risk multiplier under each hidden regime (after the fact:
    equal values mean the master ignored the regime)."""
    head = "| foresight | seed | " + " | ".join(GO_NAMES) + " | drawdown cut vs matched | go | beats defensive |"
    head += " risk multiplier: bull / bear / crisis / warning |"
    lines = [head, "|" + "---|" * (len(GO_NAMES) + 6)]
    for p in sorted(pieces, key=lambda p: (-p["foresight"], p["seed"])):
        b, go, by = p["backtest"], p["go_criterion"], p["directive_analysis"].get("by_regime", {})
        cells = [f"{b[k]['sharpe']:.2f} / {b[k]['max_drawdown']:.1%} / {b[k]['exposure']:.3f}" for k in GO_NAMES]
        verdict = "passed" if go["passed"] else "missed"
        beats = "yes" if b["master"]["sharpe"] >= b["defensive"]["sharpe"] else "no"
        risk = " / ".join(f"{by[r]['risk_multiplier']:.2f}" if r in by else "-" for r in REGIMES)
        lines.append(f"| {p['foresight']:g} | {p['seed']} | " + " | ".join(cells)
                     + f" | {go['drawdown_cut_vs_matched_neutral']:.1%} | {verdict} | {beats} | {risk} |")  # fmt: skip
    return "\n".join(lines)


def go(jobs: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    todo = [(f, k) for f in GO_FORESIGHT for k in GO_SEEDS if not (GO_DIR / f"{f:g}_seed{k}.json").exists()]
    print(f"{len(todo)} pieces to run, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(go_piece, f, k) for f, k in todo]:
            future.result()
    pieces = [json.loads(f.read_text()) for f in sorted(GO_DIR.glob("*.json"))]
    passed = {f"{f:g}": sum(p["go_criterion"]["passed"] for p in pieces if p["foresight"] == f) for f in GO_FORESIGHT}
    beats = {f"{f:g}": sum(p["backtest"]["master"]["sharpe"] >= p["backtest"]["defensive"]["sharpe"] for p in pieces
                           if p["foresight"] == f) for f in GO_FORESIGHT}  # fmt: skip
    record = {"benchmark": "mappo_go", "passed_by_foresight": passed, "beats_defensive_by_foresight": beats,
              "table": go_table(pieces),
              "symbol_steps": GO_SYMBOL_STEPS, "master_steps": GO_MASTER_STEPS, "pieces": pieces}  # fmt: skip
    write_json(ROOT / "benchmarks" / "results" / "mappo_go.json", record)
    print(record["table"])


def by_regime(seeds: tuple[int, ...]) -> None:
    """Where the symbol level earns, by hidden regime: the rule ceiling (fitted on train) backtested on the test split
    of the regime market (foresight 0.5) in portfolio mode, its book's mean return per bar and annualised Sharpe under
    each hidden regime label, beside the benchmark's. If the edge earns as much in bear and crisis bars as in bull
    ones, a master has nothing to gain by de-risking ahead of a downturn."""
    import numpy as np

    import backtest as bt
    import market_data as md
    import trading_env as te

    rows = []
    for seed in seeds:
        cfg = md.DataConfig(years=10.0, regime_foresight=0.5, seed=seed, sl_signals=False, cache=False)
        market, env_cfg = md.prepare_market(cfg), te.EnvConfig()
        rule = bt.fit_rule(market, env_cfg, "train")
        report = bt.run_backtest(bt.rule_policy(rule), market, "test", env_cfg, seed, mode="portfolio")
        bars = report["series"]["start"] + np.arange(len(report["series"]["exposure"]))
        label, curve, bench = market.data.regime_labels[bars], report["curve"], market.data.benchmark
        r, b = np.diff(curve) / curve[:-1], bench[bars + 1] / bench[bars] - 1.0
        for k, name in enumerate(REGIMES[:3]):
            m = label == k
            if m.any():
                sharpe = float(r[m].mean() / r[m].std() * np.sqrt(market.data.bars_per_year)) if r[m].std() > 0 else 0.0
                row = {"seed": seed, "regime": name, "bars": int(m.sum()), "book_bps_per_bar": 1e4 * r[m].mean(),
                       "sharpe": sharpe, "benchmark_bps_per_bar": 1e4 * b[m].mean()}  # fmt: skip
                rows.append(row)
                print(f"seed {seed} {name:6s}: {row['bars']:5d} bars, rule book {row['book_bps_per_bar']:.2f} bps/bar "
                      f"(Sharpe {sharpe:.2f}), benchmark {row['benchmark_bps_per_bar']:.2f} bps/bar")  # fmt: skip
    write_json(ROOT / "benchmarks" / "results" / "mappo_by_regime.json", {"benchmark": "mappo_by_regime", "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--go", action="store_true", help="the go-criterion benchmark (pieces, then mappo_go.json)")
    parser.add_argument("--by-regime", action="store_true", help="the rule ceiling's earnings by hidden regime")
    parser.add_argument("--jobs", type=int, default=2, help="--go: pieces run at once (one process each)")
    parser.add_argument("--quick", action="store_true", help="fewer envs and iterations (about a minute)")
    parser.add_argument("--json", default=None, help="write the record to this path")
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS of the training process (1 on a shared CPU)"
    )
    opts = parser.parse_args()
    if opts.go:
        return go(opts.jobs)
    if opts.by_regime:
        return by_regime(GO_SEEDS)
    iterations = 3 if opts.quick else 5
    sizes = [(10, 8 if opts.quick else 16), (143, 2 if opts.quick else 4)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for num_symbols, num_envs in sizes:
            results[f"S{num_symbols}"] = measure(num_symbols, num_envs, 70, iterations, opts.threads, Path(tmp))
            r = results[f"S{num_symbols}"]
            print(
                f"S={num_symbols:4d} E={num_envs:3d}: {r['train_symbol_steps_per_s']:10.0f} symbol-steps/s, "
                f"{r['master_decisions_per_s']:7.1f} master decisions/s "
                f"(rollout {r['rollout_seconds_median']:.2f} s + update {r['update_seconds_median']:.2f} s)",
                file=sys.stderr,
            )
    write_json(
        opts.json,
        {
            "benchmark": "mappo_master training speed",
            "unit": "symbol-steps per second (one symbol agent's decision on one bar), median over iterations 2..",
            "quick": opts.quick,
            "machine_torch_default_threads": machine_info().get("torch_threads"),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
