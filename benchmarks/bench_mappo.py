"""mappo_master.py: training speed at S = 10 and S = 143 symbols, and (--go) whether the master adds skill.

Runs the script itself (a subprocess, periodic evaluation off, no supervised signal fit) for a few iterations at each
universe size and reads back what it logged: `charts/SPS` (symbol-steps per second, the same unit as
ppo_symbol_agent.py's) after the first iteration, which pays one-off warm-up costs, master decisions per second,
and the rollout / update split from `perf/*_seconds`. The market preparation and the final test backtest are outside
the timed loop.

    python benchmarks/bench_mappo.py --quick --json benchmarks/results/mappo_quick.json
    python benchmarks/bench_mappo.py --json benchmarks/results/mappo.json
    python benchmarks/bench_mappo.py --go --jobs 2     # pieces in results/mappo_go_heldout32/, then mappo_go.json
    python benchmarks/bench_mappo.py --go --variant anchor_best --master-flags "--master-anchor best_constant"
    python benchmarks/bench_mappo.py --compare DIR_A DIR_B  # A/B of two folders of pieces, paired per seed
    python benchmarks/bench_mappo.py --by-regime       # where the symbol level earns: mappo_by_regime.json
    python benchmarks/bench_mappo.py --by-split --protocol standard --seeds 1 2  # M / R days per split

--oracle (the preflight, before any master is trained): per market and seed, the frozen symbol agents (argmax)
under every fixed directive and under the oracle (the best directive per hidden edge state, fitted on the train
split with the hidden label: a ceiling), on the test split; prints the oracle's gain over the best constant
directive with its paired standard error. Where that gain is under one standard error, no master can show timing
skill there, and --go says so instead of calling its result a skill test.

--go: per seed (1-5) and per market, symbol agents trained by ppo_symbol_agent.py (GO_SYMBOL_STEPS, the market block
withheld from them: --env.no-symbol-regime), then a master on top of them, frozen, by mappo_master.py with its default
settings, under --protocol heldout32 (the default: PROTOCOLS below; heldout and standard are the earlier ones, kept to
reproduce their tables). Markets (GO_MARKETS): the edge-regime market (--data.edge-regime flip: momentum turns to
reversal on hidden R days, announced by a rise of the cross-sectional correlation), placebo B (the announcement without
the flip: nothing to time), placebo A (the flip with an unrelated announcement) and the old regime-foresight market
(--data.regime-foresight 0.5). Each (market, seed) is one piece in its own processes that writes its own JSON under
results/mappo_go_<protocol>[_<variant>]/ (standard: results/mappo_go[_<variant>]/); the symbol runs are kept under
.cache/bench_mappo/ for --oracle. The summary reads every piece: per seed the master, every baseline, the oracle, the
paired margin and the go flag; per market the count of seeds where the master beats every baseline, the mean margin over
the best constant with its 95% interval, the mean share of the oracle's gain and the drawdown criterion. Test splits:
~14,000 bars (heldout32), ~7,000 (heldout), ~2,600 (standard). The default protocol's go table is also written to
results/mappo_go.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, machine_info, write_json

SCRIPT = ROOT / "mappo_master.py"
GO_DIR = ROOT / "benchmarks" / "results" / "mappo_go"
SYMBOL_DIR = ROOT / ".cache" / "bench_mappo"
GO_MARKETS = {  # market -> its DataConfig fields (10-year synthetic markets, signal 0.3)
    "flip": {"edge_regime": "flip"},
    "placebo-b": {"edge_regime": "placebo-b"},
    "placebo-a": {"edge_regime": "placebo-a"},
    "foresight": {"regime_foresight": 0.5},
}
# How the data is shared between the two levels. standard: 10-year markets, the symbol agents train on the train split
# (70%), and the master on the same bars, where the agents are in-sample (their book barely loses on hidden R days
# there). heldout: 16-year markets, the symbol agents train on the first 45% (about the standard's 7 years; their
# last weights, no selection on val), the master trains on the next 30% (--split val, 4.8 years the agents never
# saw; every baseline and its risk aversion fitted there too), and the last 25% (4 years) is graded. heldout32: the
# same shares of 32-year markets (14.4, 9.6 and 8 years): twice the days for the master to learn from and for the test
# to grade, since on 16-year markets a seed's paired margins carry standard errors of 0.2-0.3 Sharpe, as large as the
# oracle's gain over the rules.
PROTOCOLS = {
    "standard": {"data": ["--data.years", "10"], "symbols": [], "master": []},
    "heldout": {
        "data": ["--data.years", "16", "--data.train-frac", "0.45", "--data.val-frac", "0.3"],
        "symbols": ["--final-weights", "last", "--eval-interval", "0"],
        "master": ["--split", "val"],
    },
    "heldout32": {
        "data": ["--data.years", "32", "--data.train-frac", "0.45", "--data.val-frac", "0.3"],
        "symbols": ["--final-weights", "last", "--eval-interval", "0"],
        "master": ["--split", "val"],
    },
}
DEFAULT_PROTOCOL = "heldout32"  # --go's: its go table is also written to results/mappo_go.json
GO_SEEDS = (1, 2, 3, 4, 5)
GO_SYMBOL_STEPS = 2_000_000
GO_BASELINES = ("best_constant", "vol_target", "corr_rule", "reactive_rule")
GO_NAMES = ("master", *GO_BASELINES, "neutral", "oracle")
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365}  # Student t, 97.5%, by sample size


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


def data_flags(market: str, seed: int, protocol: str = "standard") -> list[str]:
    flags = [*PROTOCOLS[protocol]["data"], "--data.seed", str(seed)]
    for key, value in GO_MARKETS[market].items():
        flags += [f"--data.{key.replace('_', '-')}", str(value)]
    return flags


def symbol_run(market: str, seed: int, see_block: bool = False, protocol: str = "standard") -> Path:
    """The piece's symbol agents (ppo_symbol_agent.py, the market block withheld unless see_block), trained once and
    kept."""
    prefix = "" if protocol == "standard" else f"{protocol}_"
    folder = SYMBOL_DIR / f"{prefix}{market}{'_visible' if see_block else ''}_seed{seed}"
    done = [p for p in folder.glob("*/summary.json") if json.loads(p.read_text()).get("status") == "complete"]
    if done:
        return done[0].parent
    cmd = [sys.executable, ROOT / "ppo_symbol_agent.py", *data_flags(market, seed, protocol), "--seed", str(seed),
           *([] if see_block else ["--env.no-symbol-regime"]), "--total-timesteps", str(GO_SYMBOL_STEPS),
           "--save-model", "--no-stress", *PROTOCOLS[protocol]["symbols"], "--run-dir", folder]  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ppo_symbol_agent.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return next(folder.iterdir())


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def go_piece(
    market: str, seed: int, folder: Path = GO_DIR, master_flags: tuple[str, ...] = (), protocol: str = "standard"
) -> Path:
    """Symbol agents, then a master on top of them, on one market and seed; writes the piece's JSON into `folder`.
    master_flags: extra mappo_master.py flags (a variant of its defaults), recorded in the piece's command; protocol:
    a key of PROTOCOLS."""
    symbols_dir = symbol_run(market, seed, protocol=protocol)
    master_flags = (*PROTOCOLS[protocol]["master"], *master_flags)
    with tempfile.TemporaryDirectory(prefix="bench_mappo_go_") as tmp:
        cmd = [sys.executable, SCRIPT, *data_flags(market, seed, protocol), "--seed", str(seed),
               "--env.no-symbol-regime", "--freeze-symbols", "--no-stress", "--eval-interval", "0",
               "--run-dir", f"{tmp}/master", "--symbol-checkpoint", symbols_dir / "checkpoint.pt",
               *master_flags]  # fmt: skip
        t0 = time.time()
        proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=ENV, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"mappo_master.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        seconds = time.time() - t0
        run = next(Path(tmp, "master").iterdir())
        master = json.loads((run / "summary.json").read_text())
        fitted = json.loads((run / "master_baselines.json").read_text())
        daily = pd.read_parquet(run / "test_daily_returns.parquet")
    symbols = json.loads((symbols_dir / "summary.json").read_text())
    flags = " ".join(data_flags(market, seed, protocol))
    symbol_flags = "".join(f" {f}" for f in PROTOCOLS[protocol]["symbols"])
    record = {
        "benchmark": "mappo_go_piece",
        "market": market,
        "seed": seed,
        "protocol": protocol,
        "commands": [f"python ppo_symbol_agent.py {flags} --seed {seed} --env.no-symbol-regime --total-timesteps "
                     f"{GO_SYMBOL_STEPS} --save-model --no-stress{symbol_flags}",
                     f"python mappo_master.py {flags} --seed {seed} --env.no-symbol-regime --freeze-symbols "
                     "--no-stress --eval-interval 0 --symbol-checkpoint <that run>/checkpoint.pt"
                     + "".join(f" {f}" for f in master_flags)],
        "symbol_agents_test": symbols["backtest"]["agent"],
        "backtest": master["backtest"],
        "go_criterion": master["go_criterion"],
        "directive_analysis": master["directive_analysis"],
        "fitted": {k: ({"best": v["best"], "defensive": v["defensive"]} if k == "fixed" else v)
                   for k, v in fitted.items()},
        "daily_returns": {"dates": [str(d.date()) for d in daily.index],
                          **{k: daily[k].tolist() for k in daily.columns}},
        "master_seconds": seconds,
        "machine": machine_info(),
    }  # fmt: skip
    path = Path(folder) / f"{market}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    go = record["go_criterion"]
    print(f"{market} seed {seed}: go {go['go']}, master {go['sharpe_master']:.2f}, margin over the best constant "
          f"{go['margin_vs_best_constant']:+.2f} (se {go['margin_se']:.2f}), oracle gain "
          f"{go['oracle_gain'] if go['oracle_gain'] is None else round(go['oracle_gain'], 2)}", flush=True)  # fmt: skip
    return path


def interval95(values: list[float]) -> tuple[float, list[float] | None]:
    """Mean and Student-t 95% interval over seeds."""
    n, mean = len(values), float(np.mean(values)) if values else float("nan")
    if n < 2:
        return mean, None
    half = T_975.get(n, 1.96) * float(np.std(values, ddof=1)) / np.sqrt(n)
    return mean, [mean - half, mean + half]


def margin_over(piece: dict, name: str) -> tuple:
    """The master's paired Sharpe margin over `name` (backtest.paired_daily_margin) from the piece's daily returns:
    re-scored from the stored returns, no retraining."""
    import backtest as bt

    daily = piece["daily_returns"]
    return bt.paired_daily_margin(np.asarray(daily["master"]), np.asarray(daily[name]), 252.0)


def oracle_count(pieces: list[dict]) -> int:
    """How many pieces' oracle has a test Sharpe at least that of every baseline: the go criterion's count for the
    ceiling itself, so that a master's count is read against what a master that knew the hidden state would reach on
    the same test days."""
    return sum(
        p["backtest"]["oracle"]["sharpe"] >= max(p["backtest"][k]["sharpe"] for k in GO_BASELINES) for p in pieces
    )


def market_summary(pieces: list[dict]) -> dict:
    """Per market, over its seeds: the go counts, the mean paired margin over the best constant with its 95%
    interval, the oracle's mean gain and whether it clears one standard error across seeds (else no skill test),
    the master's mean share of the oracle's gain and the drawdown criterion."""
    out = {}
    for market in GO_MARKETS:
        ps = [p for p in pieces if p["market"] == market]
        if not ps:
            continue
        gos = [p["go_criterion"] for p in ps]
        margin, margin_ci = interval95([g["margin_vs_best_constant"] for g in gos])
        gains = [g["oracle_gain"] for g in gos if g["oracle_gain"] is not None]
        gain, gain_ci = interval95(gains)
        gain_se = float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else None
        shares = [g["master_share_of_oracle_gain"] for g in gos if g["master_share_of_oracle_gain"] is not None]
        vs_neutral = [margin_over(p, "neutral")[0] for p in ps if "neutral" in p.get("daily_returns", {})]
        neutral, neutral_ci = interval95(vs_neutral)
        out[market] = {
            "seeds": len(ps),
            "beats_every_baseline": sum(g["sharpe_passed"] for g in gos),
            "oracle_beats_every_baseline": oracle_count(ps) if gains else None,
            "drawdown_passed": sum(g["drawdown_passed"] for g in gos),
            "go": sum(g["go"] for g in gos),
            "margin_mean": margin,
            "margin_ci95": margin_ci,
            "oracle_gain_mean": gain if gains else None,
            "oracle_gain_ci95": gain_ci,
            "skill_test": bool(gains) and gain_se is not None and gain >= gain_se,
            "master_share_of_oracle_gain_mean": float(np.mean(shares)) if shares else None,
            "margin_vs_neutral_mean": neutral if vs_neutral else None,
            "margin_vs_neutral_ci95": neutral_ci,
            "master_above_neutral": sum(m > 0 for m in vs_neutral),
        }
    return out


def go_table(pieces: list[dict]) -> str:
    """One row per piece: test Sharpe of the master, each baseline and the oracle; the paired margin over the best
    constant (se), the oracle's gain (se), the master's exposure beside the best constant's, the drawdown cut vs the
    exposure-matched best constant, P(defensive | R) / P(defensive | M) and the master's exposure on R / M days
    (after the fact), and go."""
    head = "| market | seed | " + " | ".join(GO_NAMES) + " | margin (se) | oracle gain (se) | exposure master / const |"
    head += " drawdown cut | P(def. \\| R) / P(def. \\| M) | master exposure R / M | go |"
    lines = [head, "|" + "---|" * (len(GO_NAMES) + 9)]
    order = list(GO_MARKETS)
    for p in sorted(pieces, key=lambda p: (order.index(p["market"]), p["seed"])):
        b, g, why = p["backtest"], p["go_criterion"], p["directive_analysis"]
        cells = [f"{b[k]['sharpe']:.2f}" if k in b else "-" for k in GO_NAMES]
        gain = "-" if g["oracle_gain"] is None else f"{g['oracle_gain']:+.2f} ({g['oracle_gain_se']:.2f})"
        pdef = "-"
        if why.get("p_defensive_given_R") is not None:
            pdef = f"{why['p_defensive_given_R']:.2f} / {why['p_defensive_given_M']:.2f}"
        state = why.get("by_edge_state", {})
        held = f"{state['R']['exposure']:.3f} / {state['M']['exposure']:.3f}" if {"R", "M"} <= set(state) else "-"
        lines.append(f"| {p['market']} | {p['seed']} | " + " | ".join(cells)
                     + f" | {g['margin_vs_best_constant']:+.2f} ({g['margin_se']:.2f}) | {gain} | "
                     f"{g['exposure_master']:.3f} / {g['exposure_best_constant']:.3f} | "
                     f"{g['drawdown_cut_vs_matched_best_constant']:.1%} | {pdef} | {held} | "
                     f"{'yes' if g['go'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def summary_table(summary: dict) -> str:
    lines = ["| market | seeds | master >= every baseline | oracle >= every baseline | drawdown cut >= 15% | go | "
             "margin over best constant, mean [95% CI] | oracle gain, mean [95% CI] | skill test | master's share of "
             "the oracle gain | margin over the neutral directive, mean [95% CI] (seeds above) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ci = lambda m, c: f"{m:+.2f} [{c[0]:+.2f}, {c[1]:+.2f}]" if c else f"{m:+.2f}"  # noqa: E731
    for market, m in summary.items():
        gain = "-" if m["oracle_gain_mean"] is None else ci(m["oracle_gain_mean"], m["oracle_gain_ci95"])
        share = "-" if m["master_share_of_oracle_gain_mean"] is None else f"{m['master_share_of_oracle_gain_mean']:.0%}"
        test = "yes" if m["skill_test"] else "no (oracle gain < 1 se)"
        neutral = "-"
        if m.get("margin_vs_neutral_mean") is not None:
            neutral = f"{ci(m['margin_vs_neutral_mean'], m['margin_vs_neutral_ci95'])} ({m['master_above_neutral']})"
        oracle = "-" if m.get("oracle_beats_every_baseline") is None else m["oracle_beats_every_baseline"]
        lines.append(f"| {market} | {m['seeds']} | {m['beats_every_baseline']} | {oracle} | {m['drawdown_passed']} | "
                     f"{m['go']} | "
                     f"{ci(m['margin_mean'], m['margin_ci95'])} | {gain} | {test} | {share} | {neutral} |")  # fmt: skip
    return "\n".join(lines)


def go(
    jobs: int, markets: list[str], seeds: tuple[int, ...], variant: str = "", master_flags=(), protocol="standard"
) -> None:
    """Every missing piece of markets x seeds, `jobs` at a time, then the summary. variant: the pieces go to
    results/mappo_go_<variant>/ (and the summary to mappo_go_<variant>.json), with master_flags added to every
    mappo_master.py run; "" is the default settings' results/mappo_go/. A protocol other than standard adds its name
    to the folder's (mappo_go_heldout, mappo_go_heldout_<variant>)."""
    from concurrent.futures import ThreadPoolExecutor

    name = "_".join(x for x in (GO_DIR.name, "" if protocol == "standard" else protocol, variant) if x)
    folder = GO_DIR.with_name(name)
    todo = [(m, k) for m in markets for k in seeds if not (folder / f"{m}_seed{k}.json").exists()]
    print(f"{len(todo)} pieces to run in {folder.name}, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(go_piece, m, k, folder, tuple(master_flags), protocol) for m, k in todo]:
            future.result()
    record = summarise(folder)
    if not variant and protocol == DEFAULT_PROTOCOL:  # the go table of the script's defaults
        write_json(ROOT / "benchmarks" / "results" / "mappo_go.json", record)


def go_pieces(folder: Path) -> list[dict]:
    """Every go piece (market_seedK.json) in `folder`."""
    return [json.loads(f.read_text()) for f in sorted(Path(folder).glob("*.json"))]


def summarise(folder: Path) -> dict:
    """The go tables from the pieces in `folder` (no training): results/<folder name>.json (the pieces without their
    daily returns, which stay in the folder) and stdout; returns that record."""
    pieces = go_pieces(folder)
    if not pieces:
        raise SystemExit(f"no go pieces (*.json) in {folder}: run --go first, or name a folder that holds them")
    summary = market_summary(pieces)
    record = {"benchmark": "mappo_go", "pieces_folder": Path(folder).name, "markets": summary,
              "summary_table": summary_table(summary), "table": go_table(pieces), "symbol_steps": GO_SYMBOL_STEPS,
              "pieces": [{k: v for k, v in p.items() if k != "daily_returns"} for p in pieces]}  # fmt: skip
    write_json(ROOT / "benchmarks" / "results" / f"{Path(folder).name}.json", record)
    print(record["summary_table"] + "\n\n" + record["table"])
    return record


def compare(folder_a: Path, folder_b: Path, out: Path | None = None) -> dict:
    """A/B of two folders of go pieces (two variants of the master's settings on the same markets, seeds and
    protocol, so the same frozen agents and test days): per (market, seed) in both, the paired Sharpe margin of A's
    master over B's from their stored daily returns (backtest.paired_daily_margin, Newey-West se), then per market
    the mean over seeds with its Student-t 95% interval and the seeds where A is ahead. No training; writes `out`
    (default results/mappo_compare_<A>_vs_<B>.json), prints the table and returns the record."""
    a, b = ({(p["market"], p["seed"]): p for p in go_pieces(folder)} for folder in (folder_a, folder_b))
    common = sorted(set(a) & set(b), key=lambda key: (list(GO_MARKETS).index(key[0]), key[1]))
    if not common:
        raise SystemExit(f"no (market, seed) piece in both {folder_a} and {folder_b}: run --go for both variants")
    rows, markets = [], {}
    for market, seed in common:
        margin, se = bt_paired(a[market, seed], b[market, seed])
        sharpes = [x[market, seed]["backtest"]["master"]["sharpe"] for x in (a, b)]
        rows.append({"market": market, "seed": seed, "sharpe_a": sharpes[0], "sharpe_b": sharpes[1],
                     "margin": margin, "se": se})  # fmt: skip
        markets.setdefault(market, []).append(margin)
    names = Path(folder_a).name, Path(folder_b).name
    lines = [f"| market | seeds | margin of {names[0]}'s master over {names[1]}'s, mean [95% CI] | seeds ahead | "
             "per seed: margin (se) |", "|---|---|---|---|---|"]  # fmt: skip
    summary = {}
    for market, margins in markets.items():
        mean, ci = interval95(margins)
        summary[market] = {"seeds": len(margins), "margin_mean": mean, "margin_ci95": ci,
                           "seeds_ahead": sum(m > 0 for m in margins)}  # fmt: skip
        per_seed = ", ".join(f"{r['margin']:+.2f} ({r['se']:.2f})" for r in rows if r["market"] == market)
        interval = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        lines.append(f"| {market} | {len(margins)} | {mean:+.2f}{interval} | {summary[market]['seeds_ahead']} | "
                     f"{per_seed} |")  # fmt: skip
    table = "\n".join(lines)
    record = {"benchmark": "mappo_compare", "a": names[0], "b": names[1], "markets": summary, "rows": rows,
              "table": table}  # fmt: skip
    write_json(out or ROOT / "benchmarks" / "results" / f"mappo_compare_{names[0]}_vs_{names[1]}.json", record)
    print(table)
    return record


def bt_paired(piece_a: dict, piece_b: dict) -> tuple:
    """The paired Sharpe margin (margin, se) of piece_a's master over piece_b's on the same test days."""
    import backtest as bt

    ra, rb = (np.asarray(p["daily_returns"]["master"]) for p in (piece_a, piece_b))
    if len(ra) != len(rb):
        raise SystemExit(f"the two pieces of {piece_a['market']} seed {piece_a['seed']} cover different test days")
    return bt.paired_daily_margin(ra, rb, 252.0)


def prepared_market(market: str, seed: int, protocol: str = "standard"):
    """The market of --go's pieces (data_flags' DataConfig), prepared in this process."""
    import tyro

    import market_data as md

    flags = [*data_flags(market, seed, protocol), "--cache-dir", str(ROOT / ".cache" / "market")]
    cfg = tyro.cli(md.DataConfig, args=[f.replace("--data.", "--") for f in flags])
    return md.prepare_market(cfg), cfg


def frozen_argmax(run: Path, prepared, cfg):
    """The symbol agents of a ppo_symbol_agent.py run as an argmax policy (mappo_master.py's argmax_policy)."""
    import torch

    import experiment as xp
    from mappo_master import argmax_policy

    torch.set_num_threads(1)
    agent, _ = xp.load_symbol_agents(str(run / "checkpoint.pt"), len(prepared.data.symbols), market=prepared, data=cfg)
    return argmax_policy(agent.eval(), "cpu")


def block_finding(seeds: tuple[int, ...]) -> None:
    """Do symbol agents that see the market-regime block learn the flip themselves? On the flip market, per seed,
    agents trained with the block withheld (the --go runs) and with it visible: the book of each (argmax, portfolio
    mode, neutral directive, test split) and its mean return in basis points per bar on the hidden M and R days, and
    its exposure there. An agent that learned the flip would stop losing on R days."""
    import backtest as bt
    import trading_env as te

    rows = []
    for seed in seeds:
        prepared, cfg = prepared_market("flip", seed)
        for see in (False, True):
            policy = frozen_argmax(symbol_run("flip", seed, see_block=see), prepared, cfg)
            report = bt.run_backtest(policy, prepared, "test", te.EnvConfig(symbol_regime=see), seed, "portfolio")
            bars = report["series"]["start"] + np.arange(len(report["series"]["exposure"]))
            r, label = np.diff(report["curve"]) / report["curve"][:-1], prepared.data.edge_labels[bars]
            row = {"seed": seed, "sees_block": see, "sharpe": report["agent"]["sharpe"]}
            for k, state in enumerate(("M", "R")):
                row[f"bps_per_bar_{state}"] = float(1e4 * r[label == k].mean())
                row[f"exposure_{state}"] = float(report["series"]["exposure"][label == k].mean())
            rows.append(row)
            print(f"seed {seed} block {'visible' if see else 'withheld'}: Sharpe {row['sharpe']:.2f}, M "
                  f"{row['bps_per_bar_M']:+.3f} bps/bar at exposure {row['exposure_M']:.3f}, R "
                  f"{row['bps_per_bar_R']:+.3f} bps/bar at exposure {row['exposure_R']:.3f}", flush=True)  # fmt: skip
    write_json(ROOT / "benchmarks" / "results" / "mappo_block_finding.json",
               {"benchmark": "mappo_block_finding", "symbol_steps": GO_SYMBOL_STEPS, "rows": rows})  # fmt: skip


def by_split(seeds: tuple[int, ...], protocol: str = "standard") -> None:
    """Where does the master have something to learn? On the flip market, per seed and split, the frozen --go symbol
    agents' book (argmax, portfolio mode) under the neutral directive and under the best constant fitted on train,
    and its mean return in basis points per day (7 bars) on hidden M and R days. The symbol agents are in-sample on
    their train split: a master that trains there sees the book it would time at its best."""
    import backtest as bt
    import trading_env as te

    rows = []
    for seed in seeds:
        prepared, cfg = prepared_market("flip", seed, protocol)
        policy = frozen_argmax(symbol_run("flip", seed, protocol=protocol), prepared, cfg)
        env_cfg = te.EnvConfig(symbol_regime=False)
        best = bt.fit_fixed_directive(policy, prepared, env_cfg, seed, 7)["best"]
        for split in ("train", "val", "test"):
            books = bt.stack_choosers([bt.fixed_directive(te.NEUTRAL_DIRECTIVE), bt.fixed_directive(best)])
            sweep = bt.sweep_backtests(policy, prepared, split, env_cfg, seed, 7, books, 2)
            r = np.diff(sweep["curves"], axis=1) / sweep["curves"][:, :-1]
            label = prepared.data.edge_labels[sweep["start"] + np.arange(r.shape[1])]
            row = {"seed": seed, "split": split, "best_constant": best, "share_R": float(label.mean())}
            for e, book in enumerate(("neutral", "best_constant")):
                for k, state in enumerate(("M", "R")):
                    row[f"{book}_bps_per_day_{state}"] = float(7e4 * r[e][label == k].mean())
            rows.append(row)
            print(
                f"seed {seed} {split:5s} (R {row['share_R']:.2f} of bars): best constant M "
                f"{row['best_constant_bps_per_day_M']:+.2f} / R {row['best_constant_bps_per_day_R']:+.2f} bps a day,"
                f" neutral M {row['neutral_bps_per_day_M']:+.2f} / R {row['neutral_bps_per_day_R']:+.2f}",
                flush=True,
            )
    name = "mappo_by_split" if protocol == "standard" else f"mappo_by_split_{protocol}"
    write_json(ROOT / "benchmarks" / "results" / f"{name}.json",
               {"benchmark": name, "protocol": protocol, "rows": rows})  # fmt: skip


def oracle(markets: list[str], seeds: tuple[int, ...]) -> None:
    """The preflight: the oracle's gain over the best constant directive on the test split, per market and seed, on
    the frozen symbol agents of --go (trained here when missing)."""
    import backtest as bt
    import trading_env as te

    rows = []
    for market in markets:
        for seed in seeds:
            prepared, cfg = prepared_market(market, seed)
            policy = frozen_argmax(symbol_run(market, seed), prepared, cfg)
            env_cfg = te.EnvConfig(symbol_regime=False)
            fitted = bt.fit_master_baselines(policy, prepared, env_cfg, seed, 7)
            reports, results, _ = bt.master_backtests(policy, bt.fixed_directive(fitted["fixed"]["best"]), prepared,
                                                      "test", env_cfg, seed, 7, fitted)  # fmt: skip
            curves = {k: r["curve"] for k, r in results.items()}
            ts = results["master"]["series"]["timestamps"]
            row = {"market": market, "seed": seed, "best_constant": fitted["fixed"]["best"],
                   "sharpe": {k: reports[k]["sharpe"] for k in reports}}  # fmt: skip
            if "oracle" in curves:
                gain, se = bt.paired_sharpe_margin(curves["oracle"], curves["best_constant"], ts, prepared)
                row |= {
                    "oracle": fitted["oracle"],
                    "oracle_gain": gain,
                    "oracle_gain_se": se,
                    "preflight_ok": bool(gain >= se),
                }
                print(
                    f"{market} seed {seed}: oracle gain over the best constant {gain:+.2f} (se {se:.2f}): "
                    f"{'a skill test is possible' if gain >= se else 'under one se: no skill test'}",
                    flush=True,
                )
            rows.append(row)
    write_json(ROOT / "benchmarks" / "results" / "mappo_oracle.json", {"benchmark": "mappo_oracle", "rows": rows})


def by_regime(seeds: tuple[int, ...]) -> None:
    """Where the symbol level earns, by hidden regime: the rule ceiling (fitted on train) backtested on the test split
    of the regime market (foresight 0.5) in portfolio mode, its book's mean return per bar and annualised Sharpe under
    each hidden regime label, beside the benchmark's. If the edge earns as much in bear and crisis bars as in bull
    ones, a master has nothing to gain by de-risking ahead of a downturn."""
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
        for k, name in enumerate(md.REGIME_NAMES_SYNTH):
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
    parser.add_argument("--oracle", action="store_true", help="the preflight: the oracle's gain per market and seed")
    parser.add_argument(
        "--summarise",
        metavar="DIR",
        help="the go tables from the pieces in DIR, no training "
        "(e.g. benchmarks/results/mappo_go_lambda50, the pieces before the calibrated risk aversion)",
    )
    parser.add_argument(
        "--variant",
        default="",
        help="--go: a named variant of the master's settings, its pieces in results/mappo_go_<variant>/ (needs "
        "--master-flags)",
    )
    parser.add_argument(
        "--protocol",
        default=DEFAULT_PROTOCOL,
        choices=list(PROTOCOLS),
        help="--go: how the two levels share the data (see PROTOCOLS: heldout and heldout32 train the master on bars "
        "the symbol agents never saw, of 16- and 32-year markets)",
    )
    parser.add_argument(
        "--master-flags", default="", help='--go --variant: extra mappo_master.py flags, one string ("--flag value")'
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("DIR_A", "DIR_B"),
        help="A/B of two folders of go pieces (same markets, seeds, protocol): A's master over B's, paired per seed",
    )
    parser.add_argument("--block-finding", action="store_true", help="whether symbol agents that see it learn the flip")
    parser.add_argument("--markets", nargs="+", default=list(GO_MARKETS), choices=list(GO_MARKETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(GO_SEEDS))
    parser.add_argument("--by-split", action="store_true", help="the agents' book on M / R days, per split (flip)")
    parser.add_argument("--by-regime", action="store_true", help="the rule ceiling's earnings by hidden regime")
    parser.add_argument("--jobs", type=int, default=2, help="--go: pieces run at once (one process each)")
    parser.add_argument("--quick", action="store_true", help="fewer envs and iterations (about a minute)")
    parser.add_argument("--json", default=None, help="write the record to this path")
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS of the training process (1 on a shared CPU)"
    )
    opts = parser.parse_args()
    if bool(opts.variant) != bool(opts.master_flags) or (opts.variant and not opts.go):
        print("bench_mappo.py: --variant and --master-flags go together, with --go (a variant is a named set of "
              'mappo_master.py flags: --go --variant anchor_best --master-flags "--master-anchor best_constant")',
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    if opts.go:
        return go(opts.jobs, opts.markets, tuple(opts.seeds), opts.variant, opts.master_flags.split(), opts.protocol)
    if opts.summarise:
        return summarise(Path(opts.summarise))
    if opts.compare:
        return compare(*map(Path, opts.compare))
    if opts.oracle:
        return oracle(opts.markets, tuple(opts.seeds))
    if opts.block_finding:
        return block_finding(tuple(opts.seeds))
    if opts.by_split:
        return by_split(tuple(opts.seeds), opts.protocol)
    if opts.by_regime:
        return by_regime((1, 2, 3))
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
