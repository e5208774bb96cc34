"""Is there an edge on real bars, or did we fit noise? ppo_symbol_agent.py --walk-forward on real market data that
ships inside a registry package (no download): the `backtesting` package's daily GOOG bars (2004-2013) and hourly
EURUSD bars (2017-2018). Each fold trains from scratch on its own train split, picks its weights on its own
validation split and is graded on its test block; the folds' test days are stitched into one out-of-sample record.

    python benchmarks/bench_walk_forward.py --data goog       # one data set: results/walk_forward/goog.json
    python benchmarks/bench_walk_forward.py --all             # every missing data set, one after the other
    python benchmarks/bench_walk_forward.py --summary         # results/walk_forward.json and the tables

A piece records per fold the agent's and every baseline's test Sharpe, the stitched record with its PSR and DSR,
each fold's stress table and the seed's Phase-3 check (best validation Sharpe > 0.3), whatever they show.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, machine_info, write_json

SCRIPT = ROOT / "ppo_symbol_agent.py"
RESULTS = ROOT / "benchmarks" / "results"
PIECES = RESULTS / "walk_forward"
STEPS = 1_000_000  # symbol-steps per fold
# name -> (file in the backtesting package, folds, extra flags, what the costs are)
DATA = {
    "goog": (
        "GOOG.csv",
        4,
        [],
        "equity costs (7.5 bps commission + 1 bp spread a side, square-root impact on the reported volume)",
    ),
    "eurusd": (
        "EURUSD.csv",
        3,
        ["--env.commission-bps", "0.5", "--env.volume-free-cost-bps", "1.0"],
        "FX costs: 0.5 bp commission + 1 bp flat slippage a side; the file's volume column (tick counts, not "
        "traded notional) is set to 0, so no impact model applies",
    ),
}


def source_file(name: str, folder: Path) -> Path:
    """The data set as the user would pass it: GOOG as shipped; EURUSD with its tick-count volume set to 0."""
    import backtesting  # a dev requirement

    src = Path(backtesting.__file__).parent / "test" / DATA[name][0]
    if name != "eurusd":
        return src
    bars = pd.read_csv(src).assign(Volume=0.0)  # a volume-free symbol: traded under the flat cost model
    path = folder / "EURUSD.csv"
    bars.to_csv(path, index=False)
    return path


def run_piece(name: str, steps: int = STEPS) -> Path:
    """Walk-forward on one data set; writes results/walk_forward/<name>.json."""
    _, folds, extra, costs = DATA[name]
    with tempfile.TemporaryDirectory(prefix="bench_walk_forward_") as tmp:
        src = source_file(name, Path(tmp))
        flags = [
            "--data.source",
            str(src),
            "--walk-forward",
            str(folds),
            "--total-timesteps",
            str(steps),
            "--exp-name",
            f"walk_forward_{name}",
            *extra,
        ]
        cmd = [sys.executable, str(SCRIPT), *flags, "--run-dir", tmp]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            )
        (parent,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        report = json.loads((parent / "walk_forward.json").read_text())
        runs = [parent / f["run"] for f in report["folds"]]
        summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
        daily = pd.read_parquet(parent / "walk_forward_daily_returns.parquet")
    shown = "--data.source " + (f"<backtesting>/test/{DATA[name][0]}" if name != "eurusd" else "EURUSD.csv")
    record = {
        "benchmark": "walk_forward_piece",
        "data": name,
        "costs": costs,
        "folds": folds,
        "steps_per_fold": steps,
        "command": f"python ppo_symbol_agent.py {shown} " + " ".join(flags[2:]),
        "wall_s": time.time() - t0,
        "walk_forward": report,
        "stress": [s["stress"] for s in summaries],
        "best_val_sharpe": [s["best_val_sharpe"] for s in summaries],
        "rule": [s["rule"] for s in summaries],
        "daily_returns": {"dates": [str(d.date()) for d in daily.index]} | {k: daily[k].tolist() for k in daily},
        "machine": machine_info(),
    }
    path = PIECES / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    stitched = report["stitched"]["agent"]
    print(
        f"{name}: stitched out-of-sample Sharpe {stitched['sharpe']:.2f} (se {stitched['sharpe_se']:.2f})", flush=True
    )
    return path


def num(x, spec: str = ".2f") -> str:
    """x formatted, or "-" where a metric is undefined (e.g. the Sharpe error of a book that never traded)."""
    return "-" if x is None else format(x, spec)


def tables(pieces: list[dict]) -> str:
    """Per data set: the per-fold table, the stitched record, the stress table (mean over folds), Phase-3."""
    out = []
    for p in pieces:
        wf, key = p["walk_forward"], "agent"
        names = [n for n in wf["stitched"] if n != key]
        head = f"**{p['data']}** ({p['folds']} folds, {p['steps_per_fold']:,} symbol-steps each; {p['costs']}):"
        columns = "| fold | test period | days | agent (se) | " + " | ".join(names) + " |"
        lines = [f"{head} `{p['command']}`", "", columns, "|---" * (len(names) + 4) + "|"]
        for f in wf["folds"]:
            se = num(f["sharpe_se"])
            cells = " | ".join(f"{f['sharpe'].get(n, float('nan')):.2f}" for n in names)
            lines.append(
                f"| {f['fold']} | {f['test_start']} .. {f['test_end']} | {f['days']} | "
                f"{f['sharpe'][key]:.2f} ({se}) | {cells} |"
            )
        st = wf["stitched"]
        cells = " | ".join(f"{st[n]['sharpe']:.2f}" for n in names)
        a = st[key]
        lines.append(
            f"| stitched | {wf['folds'][0]['test_start']} .. {wf['folds'][-1]['test_end']} | {a['days']} | "
            f"**{a['sharpe']:.2f}** ({num(a['sharpe_se'])}) | {cells} |"
        )
        lines += [
            "",
            f"Stitched agent: PSR {num(a['psr'])}, DSR {num(a.get('dsr'))} over "
            f"{a.get('dsr_trials', 1)} validation sweeps, total return {a['total_return']:+.1%}, exposure "
            f"{np.mean([f['exposure'] for f in wf['folds']]):.3f}; the seed's Phase-3 check (best validation "
            f"Sharpe > 0.3) per fold: " + ", ".join(num(v) for v in p["best_val_sharpe"]),
            "",
        ]
        scen = [row["scenario"] for row in p["stress"][0] if not row["scenario"].startswith("without_")]
        strategies = list(p["stress"][0][0]["reports"])
        lines += [
            "| stress (mean Sharpe over folds) | " + " | ".join(strategies) + " |",
            "|---" * (len(strategies) + 1) + "|",
        ]
        for s in scen:
            rows = [next(r for r in fold if r["scenario"] == s) for fold in p["stress"]]
            cells = " | ".join(f"{np.mean([r['reports'][n]['sharpe'] for r in rows]):.2f}" for n in strategies)
            lines.append(f"| {s} | {cells} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=sorted(DATA), help="one data set")
    p.add_argument("--all", action="store_true", help="every missing data set")
    p.add_argument("--redo", action="store_true", help="rerun data sets that already have a JSON")
    p.add_argument("--steps", type=int, default=STEPS, help="symbol-steps per fold")
    p.add_argument("--summary", action="store_true", help="assemble results/walk_forward.json and print the tables")
    args = p.parse_args()
    if args.data:
        run_piece(args.data, args.steps)
    if args.all:
        for name in DATA:
            if args.redo or not (PIECES / f"{name}.json").exists():
                run_piece(name, args.steps)
    if args.summary:
        pieces = [json.loads((PIECES / f"{n}.json").read_text()) for n in DATA if (PIECES / f"{n}.json").exists()]
        if not pieces:
            p.error(f"no pieces under {PIECES}: run --data or --all first")
        record = {
            "benchmark": "walk_forward",
            "tables": tables(pieces),
            "pieces": [f"benchmarks/results/walk_forward/{q['data']}.json" for q in pieces],
        }
        write_json(RESULTS / "walk_forward.json", record)
        print(record["tables"])


if __name__ == "__main__":
    main()
