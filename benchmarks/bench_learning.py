"""Does the symbol agent learn a real edge, honestly measured, and how do other learners do on the same work?
ppo_symbol_agent.py with its default settings (the anti-collapse stack on) on synthetic markets with a planted signal
of 0.5 and 0.3 and on a placebo market (0: no edge), 10 years each (test split ~2,600 bars), several seeds per market
(the market's seed is the training seed), beside every baseline of the final backtest and the rule ceiling; and other
learners ("arms") on the same markets, symbol-steps, test split, backtest and baselines.

    python benchmarks/bench_learning.py --signal 0.3 --seed 1        # one piece: writes results/learning/0.3_seed1.json
    python benchmarks/bench_learning.py --all --jobs 2               # every missing piece, two processes at a time
    python benchmarks/bench_learning.py --summary                    # learning.json, learning.png, the tables
    python benchmarks/bench_learning.py --arm sb3_maskable_ours --signal 0.3 --seed 1   # one piece of another arm
    python benchmarks/bench_learning.py --all --arms ppo ppo_lstm sb3_maskable_default --signals 0.3 --seeds 1 2 3
    python benchmarks/bench_learning.py --study init_2m --all --arms ppo ppo_pretrain_masked ppo_warm_direction \
        --signals 0.3 -- --total-timesteps 2000000       # an A/B with its own budget, in its own folder
    python benchmarks/bench_learning.py --study s143_e1 --all --signals 0.3 0 -- --data.num-symbols 143 \
        --total-timesteps 2000000 --num-envs 1        # 143 symbols (1 env: what --num-envs left out gives there)
    python benchmarks/bench_learning.py --study s143_e1 --summary --against s143   # one study paired with another
    python benchmarks/bench_learning.py --study 2m --summary --pair ppo_lstm ppo_transformer   # two arms paired

Arms (--arm for one piece, --arms for --all; each piece trains for ppo_symbol_agent.py's default --total-timesteps,
4M symbol-steps, unless flags after -- say otherwise; the same flags go to every arm):

- ppo (the default): ppo_symbol_agent.py as it is (on CPU its encoder preset makes the encoder an MLP);
- ppo_cnn: the same with --encoder.kind cnn (widths from the encoder preset: d_model 128, 2 layers);
- ppo_lstm: the same with a small LSTM (SMALL_LSTM, --encoder-preset small_lstm's fields given as flags: d_model 64,
  1 layer, the small transformer's width and depth);
  the preset's 2-layer LSTM of width 128 trains at about 220 symbol-steps/s on these cores, 2.5 hours a 2M piece;
- ppo_transformer: the same with bench_train.py's small transformer (SMALL_TRANSFORMER, --encoder-preset as_given:
  d_model 64, 4 heads, 1 layer), on CPU and GPU alike;
- ppo_attention: the same with the graph module, --encoder.cross-symbol attention (docs/training.md);
- ppo_attention_aux: the graph module trained with the auxiliary next-return loss, --aux-next-return 1.0;
- ppo_graph: the graph module with its graph G started from the train split's lead-lag correlations,
  --graph-from-train 20;
- ppo_pretrain_masked, ppo_warm_direction: the same with the encoder initialised by --pretrain masked
  (masked-forecast pretraining) or --pretrain direction (SL-to-RL warm start) on the train split: the A/B arms of
  initialisation against ppo's random one;
- ppo_curriculum: the same with staged symbol onboarding, --curriculum 0.1 0.3 0.6 (10%, 30%, 60% of the symbols
  tradable over the first half of training, the rest HOLD-only; docs/training.md): the onboarding A/B arm;
- sb3_maskable_default, sb3_maskable_ours: sb3-contrib's MaskablePPO on trading_env.SB3VecEnv, with SB3's default
  hyperparameters and network, or with ppo_symbol_agent.py's values (read from its Args) for every knob SB3 has and
  its encoder and head widths as SB3's network (benchmarks/sb3_learner.py says which knobs);
- sb3_ppo_default, sb3_ppo_ours: the same with Stable-Baselines3's PPO, unmasked: an action the mask refuses is
  executed as HOLD and counted by the environment (the piece records the share refused on the test split).

The SB3 arms run benchmarks/sb3_learner.py, which reads ppo_symbol_agent.py's flags (the market, env, splits, seed,
budget) and ends with the same final backtest (backtest.agent_backtests) and run folder, with its weights picked on
the validation split as ppo_symbol_agent.py picks them; their pieces are read like ppo's.

Markets: the planted ones by signal (--signal, --signals) and the lead-lag market of issue #21 by kappa (--lead-lag,
--lead-lags; planted signal 0, each follower led by its sector's leader, 0 its placebo), keyed "ll<kappa>"; their
ceiling is the cross rule (backtest.fit_cross_rule, fitted on train), since no symbol's own window holds an edge:

    python benchmarks/bench_learning.py --all --arms ppo ppo_attention --lead-lags 0.45 0 --seeds 1 2 3 4 5

Pieces of the default arm are results/learning/<market>_seed<k>.json; of any other arm,
results/learning/<arm>/<market>_seed<k>.json. A piece is one training run in its own process that writes its own JSON
when it finishes, so that an interrupted benchmark loses nothing; --summary assembles the tables from whatever pieces
exist. Per market, for the default arm: the mean test Sharpe of the agent (argmax) with a 95% interval (Student t
over seeds), the seeds above 1.0, the mean of every baseline, the rule ceiling (the best one-feature rule fitted on
the train split) and the agent's share of it, and for the placebo the largest margin of a seed over its best baseline
in standard errors; learning.json keeps that under "markets" and every other arm's under "arms". The arms table
(printed as Markdown for BENCHMARKS.md) has per arm and market the mean test Sharpe [95% CI], its paired difference
from ppo over the seeds both have, the share of the rule ceiling and the wall-clock per piece. Sharpe ratios come
from daily returns (backtest.performance_metrics) with a Newey-West standard error; each piece stores the daily
returns of the agent and of every baseline, so that a change of metric re-scores the pieces without retraining, and
its wall-clock and the training process's peak resident memory (peak_memory_mib).
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
from bench_train import SMALL_TRANSFORMER, encoder_flags
from common import ROOT, machine_info, write_json

import experiment as xp
from market_data import UserInputError

SCRIPT = ROOT / "ppo_symbol_agent.py"
SMALL_LSTM = xp.SMALL_LSTM_ENCODER  # ppo_lstm (--encoder-preset small_lstm): see the docstring
SB3_SCRIPT = ROOT / "benchmarks" / "sb3_learner.py"
# arm -> (the script a piece runs, its flags before the piece's own); "ppo" is the default arm
ARMS = {
    "ppo": (SCRIPT, []),
    "ppo_lstm": (SCRIPT, encoder_flags(SMALL_LSTM)),
    "ppo_cnn": (SCRIPT, ["--encoder.kind", "cnn"]),
    "ppo_transformer": (SCRIPT, encoder_flags(SMALL_TRANSFORMER)),
    "ppo_attention": (SCRIPT, ["--encoder.cross-symbol", "attention"]),
    "ppo_attention_aux": (SCRIPT, ["--encoder.cross-symbol", "attention", "--aux-next-return", "1.0"]),
    "ppo_graph": (SCRIPT, ["--encoder.cross-symbol", "attention", "--graph-from-train", "20"]),
    "ppo_pretrain_masked": (SCRIPT, ["--pretrain", "masked"]),
    "ppo_warm_direction": (SCRIPT, ["--pretrain", "direction"]),
    "ppo_curriculum": (SCRIPT, ["--curriculum", "0.1", "0.3", "0.6"]),
    "sb3_maskable_default": (SB3_SCRIPT, ["--algo", "maskable_ppo", "--hparams", "default"]),
    "sb3_maskable_ours": (SB3_SCRIPT, ["--algo", "maskable_ppo", "--hparams", "ours"]),
    "sb3_ppo_default": (SB3_SCRIPT, ["--algo", "ppo", "--hparams", "default"]),
    "sb3_ppo_ours": (SB3_SCRIPT, ["--algo", "ppo", "--hparams", "ours"]),
}
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


def arm_folder(arm: str) -> Path:
    """Where an arm's pieces lie: the default arm's in PIECES itself (as before there were arms), others below it."""
    return PIECES if arm == "ppo" else PIECES / arm


def market_key(signal: float, lead_lag: float | None = None) -> str:
    """A market's name in piece files and tables: the planted signal ("0.3"), or "ll" and kappa for the lead-lag
    market ("ll0.45"; "ll0" its placebo), where no symbol's own window holds an edge."""
    return f"{signal:g}" if lead_lag is None else f"ll{lead_lag:g}"


def piece_key(piece: dict) -> str:
    return market_key(piece["signal"], piece.get("lead_lag"))


def market_order(key: str) -> tuple:
    """Table order: the planted markets by signal, strongest first, then the lead-lag ones by kappa."""
    lead_lag = key.startswith("ll")
    return (lead_lag, -float(key.removeprefix("ll")))


def piece_path(signal: float, seed: int, arm: str = "ppo", lead_lag: float | None = None) -> Path:
    return arm_folder(arm) / f"{market_key(signal, lead_lag)}_seed{seed}.json"


def run_piece(signal: float, seed: int, extra: list[str], arm: str = "ppo", lead_lag: float | None = None) -> Path:
    """Train one seed of one arm on one market and write its JSON; returns the JSON's path. lead_lag: kappa of the
    lead-lag market (--data.lead-lag; the planted signal is then 0 whatever `signal` says)."""
    script, arm_flags = ARMS[arm]
    signal = 0.0 if lead_lag is not None else signal
    flags = ["--data.signal-strength", str(signal), "--data.years", str(YEARS), "--data.seed", str(seed)]
    flags += [] if lead_lag is None else ["--data.lead-lag", str(lead_lag)]
    flags += ["--seed", str(seed), "--exp-name", f"learning_{market_key(signal, lead_lag)}", *arm_flags, *extra]
    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        t0 = time.time()
        cmd = [sys.executable, str(script), *flags, "--run-dir", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode == 2:  # the script refused its flags: the user's to fix, in the script's own words
            lines = [line.strip(" │╭╮╰╯─") for line in proc.stderr.splitlines()]  # tyro draws a box around it
            why = " ".join([line for line in lines if line][-4:]).removeprefix("error: ") or "exit status 2"
            raise UserInputError(f"arm {arm} (signal {signal:g}, seed {seed}): {why}")
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            )
        runs = list(Path(tmp).iterdir())
        if len(runs) != 1:  # e.g. flags after -- that print and exit (--help) rather than train
            raise UserInputError(f"arm {arm} (signal {signal:g}, seed {seed}): {script.name} {' '.join(extra)} left no "
                                 "run folder to grade; give the flags of a training run after --")  # fmt: skip
        (run,) = runs
        summary = json.loads((run / "summary.json").read_text())
        daily = pd.read_parquet(run / "test_daily_returns.parquet")  # every strategy's daily returns: re-scorable
    record = {
        "benchmark": "learning_piece",
        "arm": arm,
        "signal": signal,
        "lead_lag": lead_lag,
        "seed": seed,
        "years": YEARS,
        "command": f"python {script.relative_to(ROOT)} {' '.join(flags)}",
        "wall_s": time.time() - t0,
        "peak_memory_mib": summary.get("peak_memory_mib"),  # the training process's own (VmHWM)
        "test": summary["backtest"],
        "val": summary["val"],
        "rule": summary["rule"],
        "deciles": summary["deciles"],
        "telemetry": summary["telemetry"],
        "global_step": summary["global_step"],
        "val_sharpes": summary["val_sharpes"],
        "val_steps": summary.get("val_steps"),  # the global step of each of them (SB3 arms: not recorded)
        "pretrain": summary.get("pretrain"),  # --pretrain's record (objective, losses, the epoch kept), if any
        "daily_returns": {"dates": [str(d.date()) for d in daily.index]} | {k: daily[k].tolist() for k in daily},
        "machine": machine_info(),
    }
    if "sb3" in summary:  # the algorithm, its keyword arguments, the share of actions the mask refused on test
        record["sb3"] = summary["sb3"]
    if summary.get("cross_rule") is not None:  # the lead-lag market's cross rule, fitted on train
        record["cross_rule"] = summary["cross_rule"]
    path = piece_path(signal, seed, arm, lead_lag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    agent, ceiling = record["test"]["agent"]["sharpe"], record["test"]["rule_ceiling"]["sharpe"]
    if "cross_rule" in record["test"]:  # the lead-lag market's ceiling
        ceiling = record["test"]["cross_rule"]["sharpe"]
    print(f"{arm} market {market_key(signal, lead_lag)} seed {seed}: test Sharpe {agent:.2f} (ceiling {ceiling:.2f})",
          flush=True)  # fmt: skip
    return path


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and its 95% interval (Student t with n - 1 degrees of freedom)."""
    from scipy import stats

    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half


def mean_or_none(values: list) -> float | None:
    """The mean of the values that are there (pieces written before a field existed lack it); None if none is."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarize(pieces: list[dict]) -> dict:
    """Per market: the agent's mean test Sharpe and 95% interval, seeds above 1, baselines, ceiling, placebo margin.
    The ceiling is the best own-window rule on the planted markets and the cross rule on the lead-lag ones."""
    markets = {}
    for key in sorted({piece_key(p) for p in pieces}, key=market_order):
        rows = sorted((p for p in pieces if piece_key(p) == key), key=lambda p: p["seed"])
        signal, lead_lag = rows[0]["signal"], rows[0].get("lead_lag")
        sharpe = lambda name, rows=rows: np.array([r["test"][name]["sharpe"] for r in rows])  # noqa: E731
        agent, ceiling = sharpe("agent"), sharpe("rule_ceiling" if lead_lag is None else "cross_rule")
        sampled = sharpe("agent_sampled") if all("agent_sampled" in r["test"] for r in rows) else None
        mean, lo, hi = t_interval(agent)
        best = np.max([sharpe(b) for b in BASELINES], axis=0)  # each seed's best baseline
        se = np.array([r["test"]["agent"]["sharpe_se"] for r in rows], dtype=float)  # None (no risk taken): nan
        edge = signal if lead_lag is None else lead_lag  # 0: a placebo
        markets[key] = {
            "market": key,
            "signal": signal,
            "lead_lag": lead_lag,
            "ceiling": "rule_ceiling" if lead_lag is None else "cross_rule",
            "seeds": [r["seed"] for r in rows],
            "agent_sharpe": agent.tolist(),
            "agent_mean": mean,
            "agent_ci95": [lo, hi],
            "agent_sampled_mean": None if sampled is None else float(sampled.mean()),
            "seeds_above_1": int((agent > 1.0).sum()),
            "ceiling_sharpe": ceiling.tolist(),
            "ceiling_mean": float(ceiling.mean()),
            # a share of the placebo's ceiling (noise around 0) means nothing
            "share_of_ceiling": mean / float(ceiling.mean()) if edge > 0 and ceiling.mean() > 0 else None,
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
            "peak_memory_mib_mean": mean_or_none([r.get("peak_memory_mib") for r in rows]),
        }
    return markets


def table(markets: dict) -> str:
    head = "| market | seeds | agent test Sharpe: mean [95% CI] | seeds > 1 | sampled | ceiling | agent / ceiling | "
    head += " | ".join(BASELINES) + " | exposure | trade rate |"
    lines = [head, "|" + "---|" * (9 + len(BASELINES))]
    for m in markets.values():
        share = "-" if m["share_of_ceiling"] is None else f"{m['share_of_ceiling']:.0%}"
        sampled = "-" if m["agent_sampled_mean"] is None else f"{m['agent_sampled_mean']:.2f}"
        base = " | ".join(f"{m['baselines_mean'][b]:.2f}" for b in BASELINES)
        lines.append(
            f"| {m['market']} | {len(m['seeds'])} | {m['agent_mean']:.2f} [{m['agent_ci95'][0]:.2f}, "
            f"{m['agent_ci95'][1]:.2f}] | {m['seeds_above_1']} | {sampled} | "
            f"{m['ceiling_mean']:.2f} | {share} | {base} | {m['exposure_mean']:.3f} | {m['trade_rate_mean']:.3f} |"
        )
    return "\n".join(lines)


FINAL_EVALS = 5  # the last periodic evaluations that make a run's final validation level
SPEED_SHARE = 0.8  # learning speed: symbol-steps to this share of ppo's final validation level


def steps_to(piece: dict, target: float) -> float:
    """Symbol-steps at the first periodic evaluation (on the validation split) whose Sharpe reaches target; inf if
    none does. The steps are the piece's val_steps; a piece written before they were recorded is taken as evenly
    spaced up to its final step (a run whose iterations are not a multiple of --eval-interval ends with a shorter
    interval, so its earlier steps come out a little early: 2.5% for 195 iterations, the same for every arm)."""
    curve = piece["val_sharpes"]
    hit = next((i for i, v in enumerate(curve) if v >= target), None)
    if hit is None:
        return float("inf")
    steps = piece.get("val_steps")
    return float(steps[hit]) if steps else (hit + 1) * piece["global_step"] / len(curve)


def learning_speed(rows: list[dict], ref_rows: list[dict]) -> dict:
    """Per seed both arms have where ppo's final validation level (the mean of its last FINAL_EVALS periodic
    validation Sharpes) is positive: the target SPEED_SHARE x that level and the symbol-steps each arm takes to
    reach it (inf: never). A seed whose level is not positive has no target (80% of a loss is not a goal)."""
    ref = {r["seed"]: r for r in ref_rows if r.get("val_sharpes")}
    out = {"seeds": [], "target": [], "arm_steps": [], "ppo_steps": []}
    for r in (r for r in rows if r["seed"] in ref and r.get("val_sharpes")):
        level = float(np.mean(ref[r["seed"]]["val_sharpes"][-FINAL_EVALS:]))
        if level <= 0:
            continue
        target = SPEED_SHARE * level
        out["seeds"].append(r["seed"])
        out["target"].append(target)
        out["arm_steps"].append(steps_to(r, target))
        out["ppo_steps"].append(steps_to(ref[r["seed"]], target))
    return out


def summarize_arms(pieces: dict[str, list[dict]]) -> dict[str, dict]:
    """arm -> summarize() of its pieces; every market of an arm other than ppo also gets "minus_ppo", the arm's test
    Sharpe minus ppo's, paired by seed over the seeds both have (same market, same test split), with its 95%
    interval, and "speed" (learning_speed: symbol-steps to 80% of ppo's final validation Sharpe, both arms)."""
    by_arm = {arm: summarize(rows) for arm, rows in pieces.items() if rows}
    reference = by_arm.get("ppo", {})
    for arm, markets in by_arm.items():
        for key, m in markets.items():
            ref = reference.get(key)
            if arm == "ppo" or ref is None:
                continue
            m["speed"] = learning_speed(
                [p for p in pieces[arm] if piece_key(p) == key], [p for p in pieces["ppo"] if piece_key(p) == key]
            )
            theirs = dict(zip(ref["seeds"], ref["agent_sharpe"], strict=True))
            common = [k for k in m["seeds"] if k in theirs]
            diff = np.array([a - theirs[k] for k, a in zip(m["seeds"], m["agent_sharpe"], strict=True) if k in theirs])
            mean, lo, hi = t_interval(diff) if len(diff) else (float("nan"),) * 3
            m["minus_ppo"] = {"seeds": common, "diff": diff.tolist(), "mean": mean, "ci95": [lo, hi]}
    return by_arm


def speed_cell(speed: dict | None) -> str:
    """Median symbol-steps (millions) to the target over the seeds with one, arm / ppo, a seed that never reaches
    it counted as never (so the median is "never" when half of them do not), and how many never do."""
    if not speed or not speed["seeds"]:
        return "-"
    cell = []
    for key in ("arm_steps", "ppo_steps"):
        steps = np.array(speed[key], dtype=float)
        never, median = int(np.isinf(steps).sum()), float(np.median(steps))
        text = "never" if np.isinf(median) else f"{median / 1e6:.1f}"
        cell.append(text + (f" ({never} never)" if never else ""))
    return " / ".join(cell)


def arms_table(by_arm: dict[str, dict]) -> str:
    """Markdown, one row per market and arm: mean test Sharpe [95% CI], minus ppo (paired over seeds), rule ceiling
    and the arm's share of it, the best baseline (mean over seeds of each seed's best), wall-clock per piece."""
    head = "| market | arm | seeds | test Sharpe: mean [95% CI] | minus ppo, paired: mean [95% CI] | ceiling | "
    head += "share of ceiling | best baseline | minutes per piece | peak memory per piece (MiB) | "
    head += "M symbol-steps to 80% of ppo's final val, arm / ppo |"
    lines = [head, "|" + "---|" * 11]
    fmt = lambda mean, ci: f"{mean:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"  # noqa: E731
    keys = sorted({k for markets in by_arm.values() for k in markets}, key=market_order)
    for key in keys:
        for arm in (a for a in ARMS if key in by_arm.get(a, {})):
            m = by_arm[arm][key]
            share = "-" if m["share_of_ceiling"] is None else f"{m['share_of_ceiling']:.0%}"
            rss = "-" if m["peak_memory_mib_mean"] is None else f"{m['peak_memory_mib_mean']:,.0f}"
            vs = m.get("minus_ppo")
            vs = "-" if vs is None else fmt(vs["mean"], vs["ci95"]) + f" (n={len(vs['seeds'])})"
            lines.append(
                f"| {m['market']} | {arm} | {len(m['seeds'])} | {fmt(m['agent_mean'], m['agent_ci95'])} | {vs} | "
                f"{m['ceiling_mean']:.2f} | {share} | {np.mean(m['best_baseline_sharpe']):.2f} | "
                f"{m['wall_s_mean'] / 60:.1f} | {rss} | {speed_cell(m.get('speed'))} |"
            )
    return "\n".join(lines)


def load_pieces() -> dict[str, list[dict]]:
    """arm -> its pieces with daily returns (older ones, scored per bar, are announced and skipped)."""
    pieces = {}
    for arm in ARMS:
        rows = [json.loads(f.read_text()) for f in sorted(arm_folder(arm).glob("*.json"))]
        old = [f"{piece_key(q)}_seed{q['seed']}" for q in rows if "daily_returns" not in q]
        if old:  # measured before Sharpe came from daily returns: not comparable, rerun them (--redo)
            print(f"skipping {len(old)} {arm} pieces without daily returns (per-bar Sharpe; rerun with --redo): {old}")
        pieces[arm] = [q for q in rows if "daily_returns" in q]
    return pieces


def paired(mine: list[dict], theirs: list[dict], this: str, that: str) -> dict:
    """Pieces `mine` (labelled `this`) against pieces `theirs` (labelled `that`): per market, both means over the
    seeds both have and this minus that, paired by seed (same market, same test split), with its 95% interval, and
    the Markdown table of it. For two studies' default arms (--against) or two arms of one study (--pair)."""
    rows, out = [], {}
    for key in sorted({piece_key(q) for q in mine}, key=market_order):
        a = {q["seed"]: q["test"]["agent"]["sharpe"] for q in mine if piece_key(q) == key}
        b = {q["seed"]: q["test"]["agent"]["sharpe"] for q in theirs if piece_key(q) == key}
        common = sorted(set(a) & set(b))
        if not common:
            continue
        diff = np.array([a[k] - b[k] for k in common])
        mean, lo, hi = t_interval(diff)
        out[key] = {"seeds": common, "this": [a[k] for k in common], "that": [b[k] for k in common],
                    "diff": diff.tolist(), "mean": mean, "ci95": [lo, hi]}  # fmt: skip
        rows.append(f"| {key} | {len(common)} | {np.mean(out[key]['this']):.2f} | {np.mean(out[key]['that']):.2f} | "
                    f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] | {', '.join(f'{d:+.2f}' for d in diff)} |")  # fmt: skip
    head = (f"| market | seeds in both | {this} | {that} | {this} minus {that}, paired: mean [95% CI] | "
            "per seed |\n|---|---|---|---|---|---|")  # fmt: skip
    return {"this": this, "that": that, "markets": out, "table": "\n".join([head, *rows])}


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
    names = {"0": "placebo", "ll0": "lead-lag placebo"}
    ax.set_xticks(range(len(markets)), [names.get(k, f"signal {k}" if k[0] != "l" else f"lead-lag {k[2:]}")
                                        for k in markets])  # fmt: skip
    ax.set_ylabel("test-split Sharpe (annualised)")
    ax.set_title("ppo_symbol_agent.py, default settings, 10-year synthetic markets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_arms(by_arm: dict[str, dict], path: Path) -> None:
    """Per market run by more than one arm, one panel: each arm's test Sharpe per seed, its mean with the 95%
    interval, and the rule ceiling's mean over the same seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for m in by_arm.values() for k in m}, key=str)
    keys = [k for k in keys if sum(k in m for m in by_arm.values()) > 1]
    fig, axes = plt.subplots(1, len(keys), figsize=(max(6.0, 1.3 * len(by_arm)) * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        arms = [a for a in ARMS if key in by_arm.get(a, {})]
        for i, arm in enumerate(arms):
            m = by_arm[arm][key]
            x = np.full(len(m["agent_sharpe"]), i) + np.linspace(-0.12, 0.12, len(m["agent_sharpe"]))
            ax.scatter(x, m["agent_sharpe"], color="tab:blue", zorder=3, label="seeds" if i == 0 else None)
            lo, hi = m["agent_ci95"]
            if np.isfinite(lo):
                ax.errorbar(i + 0.25, m["agent_mean"], yerr=[[m["agent_mean"] - lo], [hi - m["agent_mean"]]],
                            fmt="o", color="navy", capsize=4, label="mean, 95% CI" if i == 0 else None)  # fmt: skip
            ax.scatter(i - 0.3, m["ceiling_mean"], marker="_", s=300, color="tab:green",
                       label="rule ceiling (mean, same seeds)" if i == 0 else None)  # fmt: skip
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"market {key}")
        ax.set_ylabel("test-split Sharpe (annualised)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    xp.report_user_errors()  # a piece's refused flags: one message, exit status 2, no traceback
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--signal", type=float, help="one piece: the market's planted signal strength")
    p.add_argument("--lead-lag", type=float, help="one piece: the lead-lag market's kappa instead (0: its placebo)")
    p.add_argument("--seed", type=int, help="one piece: the seed (market and training)")
    p.add_argument("--arm", choices=list(ARMS), default="ppo", help="one piece's learner (default ppo)")
    p.add_argument("--all", action="store_true", help="run every missing piece of --arms x --signals x --seeds")
    p.add_argument("--arms", choices=list(ARMS), nargs="+", help="with --all: the learners (default: --arm)")
    p.add_argument("--signals", type=float, nargs="+", help=f"with --all: planted markets (default {SIGNALS}, none "
                   "when --lead-lags is given)")  # fmt: skip
    p.add_argument("--lead-lags", type=float, nargs="+", default=[], help="with --all: lead-lag markets (kappa)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--jobs", type=int, default=2, help="pieces run at once (one process each)")
    p.add_argument("--summary", action="store_true", help="assemble learning.json and learning.png from the pieces")
    p.add_argument("--redo", action="store_true", help="rerun pieces that already have a JSON")
    p.add_argument("--study", default=None, help="a study of its own: pieces under results/learning_<STUDY>/ (the "
                   "ppo arm's there too), summary in results/learning_<STUDY>.json; for A/Bs with their own budget "
                   "(flags after --), e.g. --study init_2m -- --total-timesteps 2000000")  # fmt: skip
    p.add_argument("--against", default=None, help="with --summary: pair the default arm with that of another study "
                   "(its name; 'default' for results/learning/) by market and seed, e.g. --study s143_e1 --summary "
                   "--against s143")  # fmt: skip
    p.add_argument(
        "--pair",
        nargs=2,
        action="append",
        choices=list(ARMS),
        metavar=("ARM", "OTHER"),
        help="with --summary: ARM minus OTHER, paired by market and seed over the seeds both have, "
        "e.g. --pair ppo_lstm ppo_transformer (repeatable; every arm is paired with ppo anyway)",
    )
    p.add_argument("train_args", nargs="*", help="extra arguments for ppo_symbol_agent.py (after --), every arm")
    args = p.parse_args()
    global PIECES
    summary_path, picture = RESULTS / "learning.json", RESULTS / "learning.png"
    if args.study:
        PIECES = RESULTS / f"learning_{args.study}"
        summary_path, picture = RESULTS / f"learning_{args.study}.json", RESULTS / f"learning_{args.study}.png"
    if args.signal is not None and args.lead_lag is not None:
        p.error("a piece is on one market: give --signal (planted) or --lead-lag (kappa), not both")
    piece = args.signal is not None or args.lead_lag is not None or args.seed is not None
    if not (piece or args.all or args.summary):
        p.error("nothing to do: give --signal and --seed (one piece), --all (every missing piece) or --summary")
    if args.arms and not args.all:
        p.error("--arms lists the learners of --all; for one piece give --arm NAME with --signal and --seed")
    if args.pair and not args.summary:
        p.error("--pair pairs two arms' pieces in the summary: add --summary")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: the number of pieces run at once, 1 or more")
    if piece:
        if (args.signal is None and args.lead_lag is None) or args.seed is None:
            p.error("a piece needs --seed and a market: --signal or --lead-lag")
        run_piece(args.signal or 0.0, args.seed, args.train_args, args.arm, args.lead_lag)
    if args.all:
        arms = args.arms or [args.arm]
        signals = args.signals if args.signals is not None else ([] if args.lead_lags else list(SIGNALS))
        markets = [(s, None) for s in signals] + [(0.0, kappa) for kappa in args.lead_lags]
        todo = [(a, m, k) for k in args.seeds for m in markets for a in arms]  # seed by seed: a stop leaves pairs
        todo = [(a, m, k) for a, m, k in todo if args.redo or not piece_path(m[0], k, a, m[1]).exists()]
        print(f"{len(todo)} pieces to run, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_piece, m[0], k, args.train_args, a, m[1]) for a, m, k in todo]:
                future.result()
    if args.summary:
        pieces = load_pieces()
        if not any(pieces.values()):
            p.error(f"no pieces under {PIECES}: run --signal/--seed or --all first")
        by_arm = summarize_arms(pieces)
        markets = by_arm.get("ppo", {})
        if markets:
            plot(markets, picture)
        rel = lambda path: str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)  # noqa: E731
        listed = {a: [rel(piece_path(q["signal"], q["seed"], a, q.get("lead_lag"))) for q in pieces[a]] for a in ARMS}
        record = {"benchmark": "learning", "markets": markets, "table": table(markets), "pieces": listed["ppo"]}
        others = {arm: m for arm, m in by_arm.items() if arm != "ppo"}
        if others:  # every other arm, each in the default arm's structure, and the table of them all
            record["arms"] = {arm: {"markets": m, "pieces": listed[arm]} for arm, m in others.items()}
            record["arms_table"] = arms_table(by_arm)
            plot_arms(by_arm, picture.with_name(picture.stem + "_arms.png"))
        if args.against:
            folder = RESULTS / ("learning" if args.against == "default" else f"learning_{args.against}")
            theirs = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
            if not theirs:
                p.error(f"--against {args.against}: no pieces under {folder}")
            theirs = [q for q in theirs if "daily_returns" in q]
            record["against"] = paired(pieces["ppo"], theirs, "this study", f"study {args.against}")
            record["against"]["study"] = args.against
        for a, b in args.pair or []:
            for arm in (a, b):
                if not pieces[arm]:
                    p.error(f"--pair {a} {b}: no pieces of {arm} under {arm_folder(arm)}")
            record.setdefault("pairs", {})[f"{a} - {b}"] = paired(pieces[a], pieces[b], a, b)
        write_json(summary_path, record)
        print(record["table"])
        if others:
            print("\n" + record["arms_table"])
        if args.against:
            print("\n" + record["against"]["table"])
        for pair in record.get("pairs", {}).values():
            print("\n" + pair["table"])


if __name__ == "__main__":
    main()
