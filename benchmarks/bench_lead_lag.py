"""Calibration of the lead-lag market (--data.lead-lag KAPPA): the cross rule's test Sharpe for several kappa, beside
the planted 0.3 market's rule ceiling on the same seeds, and the placebo (kappa 0).

    python benchmarks/bench_lead_lag.py                  # writes results/lead_lag_calibration.json, prints the table
    python benchmarks/bench_lead_lag.py --kappas 0.3 0.4 --seeds 1 2 --json ''   # a look, nothing written

Each market: 10 symbols, 10 years (test split ~2,600 bars), no classifiers (the rules read technical only), seeds
1-5 (the learning benchmark's), default costs (EnvConfig()). Per lead-lag market: the cross rule (backtest.
fit_cross_rule on train, run on test with cross_rule_policy: long a follower for one bar after its leader's
top-quintile ret_1), the own-window rule ceiling (backtest.fit_rule, the best one-feature rule of a symbol's own
window, which should find nothing), the share of followers whose best lag-1 predictor on train is their leader, the
measured lag-1 correlations (leader -> follower, each symbol with itself) of returns standardised by the 70 bars
before, and the gross return per follower-bar the rule holds on test. Per planted 0.3 market: its rule ceiling
(fit_rule on train, run on test) and the gross return per bar held in the top quintile of ret_1 (threshold the 80%
quantile on train). Every Sharpe ratio is annualised from daily returns, net of the environment's costs. About two
minutes on one core.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from common import write_json

import backtest as bt
import market_data as md
from trading_env import EnvConfig

KAPPAS = (0.0, 0.2, 0.3, 0.4, 0.45, 0.5)
SEEDS = (1, 2, 3, 4, 5)
PLANTED = 0.3  # the signal strength whose rule ceiling is the margin to match
MARKET = dict(num_symbols=10, years=10.0, sl_signals=False, cache=False)


def standardised(close: np.ndarray) -> np.ndarray:
    """(T-1, S) log returns over the std of the 70 returns before them (causal), NaN where undefined."""
    r = np.diff(np.log(close), axis=0)
    return r / pd.DataFrame(r).rolling(70, min_periods=35).std().shift(1).to_numpy()


def lag1_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of a[t-1] with b[t] over the bars where both exist."""
    x, y = a[:-1], b[1:]
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def held_bps(market: md.PreparedMarket, on: np.ndarray, t: np.ndarray) -> float:
    """Mean return (bps) over the bar a position taken at decision bar t holds (open[t+1] -> open[t+2]), over the
    (bar, symbol) pairs where on (n, S) is True."""
    px = market.data.open
    ret = px[t + 2] / px[t + 1] - 1.0
    return float(1e4 * ret[on & np.isfinite(ret)].mean())


def test_bars(market: md.PreparedMarket) -> np.ndarray:
    lo, hi = market.splits["test"]
    return np.arange(max(lo, market.lookback - 1), hi - 2)


def rule_test(policy, market: md.PreparedMarket, config: EnvConfig, seed: int) -> dict:
    metrics = bt.run_backtest(policy, market, "test", config, seed)["agent"]
    return {k: metrics[k] for k in ("sharpe", "sharpe_se", "total_return", "exposure", "trades", "costs_frac")}


def lead_lag_piece(kappa: float, seed: int, config: EnvConfig) -> dict:
    cfg = md.DataConfig(**MARKET, seed=seed, signal_strength=0.0, lead_lag=kappa)
    market = md.prepare_market(cfg)
    rule = bt.fit_cross_rule(market, config)
    own = bt.fit_rule(market, config)
    leaders = market.data.leader_map
    follow = np.flatnonzero(leaders != np.arange(len(leaders)))
    z = standardised(market.data.close)
    t = test_bars(market)
    x = market.technical[t, :, rule["feature"]]
    on = np.zeros(x.shape, bool)
    on[:, follow] = x[:, leaders[follow]] > np.array(rule["thresholds"], dtype=float)[leaders[follow]]
    return {
        "kappa": kappa,
        "seed": seed,
        "cross_rule": rule_test(bt.cross_rule_policy(rule), market, config, seed) | {"fit": rule},
        "own_window_rule": rule_test(bt.rule_policy(own), market, config, seed) | {"fit": own},
        "map_recovered_on_train": rule["map_recovered"],
        "lag1_corr_leader_follower": float(np.mean([lag1_corr(z[:, leaders[f]], z[:, f]) for f in follow])),
        "lag1_autocorr_own": float(np.mean([lag1_corr(z[:, s], z[:, s]) for s in range(len(leaders))])),
        "gross_bps_per_bar_held": held_bps(market, on, t),
    }


def planted_piece(seed: int, config: EnvConfig) -> dict:
    market = md.prepare_market(md.DataConfig(**MARKET, seed=seed, signal_strength=PLANTED))
    rule = bt.fit_rule(market, config)
    lo, hi = market.splits["train"]
    x = market.technical[:, :, 0]
    theta = np.quantile(x[lo:hi][market.data.tradable[lo:hi]], 0.8)  # the top quintile of ret_1 on train
    t = test_bars(market)
    return {
        "signal_strength": PLANTED,
        "seed": seed,
        "rule_ceiling": rule_test(bt.rule_policy(rule), market, config, seed) | {"fit": rule},
        "gross_bps_per_bar_held_top_quintile": held_bps(market, x[t] > theta, t),
    }


def mean_of(rows: list[dict], *keys: str) -> float:
    """The mean over rows of row[keys[0]][keys[1]]..."""
    values = []
    for row in rows:
        for key in keys:
            row = row[key]
        values.append(row)
    return float(np.mean(values))


def by_kappa(pieces: list[dict]) -> dict[float, list[dict]]:
    return {k: [p for p in pieces if p["kappa"] == k] for k in sorted({p["kappa"] for p in pieces})}


def table(pieces: list[dict], planted: list[dict]) -> str:
    """Markdown: one row per kappa (the placebo first) and the planted market's row, Sharpe per seed and mean."""
    seeds = sorted({p["seed"] for p in planted} | {p["seed"] for p in pieces})
    head = "| market | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | own-window rule (mean) | gross bps "
    head += "per bar held | lag-1 corr leader -> follower | own lag-1 autocorr | map recovered on train |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def sharpes(rows: list[dict], key: str) -> str:
        per_seed = {r["seed"]: r[key]["sharpe"] for r in rows}
        return " | ".join(f"{per_seed[s]:.2f}" if s in per_seed else "-" for s in seeds)

    for kappa, rows in by_kappa(pieces).items():
        name = f"lead-lag {kappa:g}" + (" (placebo)" if kappa == 0 else "") + ": cross rule"
        lines.append(
            f"| {name} | {sharpes(rows, 'cross_rule')} | **{mean_of(rows, 'cross_rule', 'sharpe'):.2f}** | "
            f"{mean_of(rows, 'own_window_rule', 'sharpe'):.2f} | {mean_of(rows, 'gross_bps_per_bar_held'):.1f} | "
            f"{mean_of(rows, 'lag1_corr_leader_follower'):.3f} | {mean_of(rows, 'lag1_autocorr_own'):+.3f} | "
            f"{mean_of(rows, 'map_recovered_on_train'):.0%} |"
        )
    lines.append(
        f"| planted {PLANTED:g}: rule ceiling | {sharpes(planted, 'rule_ceiling')} | "
        f"**{mean_of(planted, 'rule_ceiling', 'sharpe'):.2f}** | (the same) | "
        f"{mean_of(planted, 'gross_bps_per_bar_held_top_quintile'):.1f} (top quintile of ret_1) | - | - | - |"
    )
    return "\n".join(lines)


def closest_kappa(pieces: list[dict], planted: list[dict]) -> float:
    """The kappa > 0 whose mean cross-rule test Sharpe is closest to the planted market's mean rule ceiling."""
    target = mean_of(planted, "rule_ceiling", "sharpe")
    means = {k: mean_of(rows, "cross_rule", "sharpe") for k, rows in by_kappa(pieces).items() if k > 0}
    return min(means, key=lambda k: abs(means[k] - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kappas", type=float, nargs="+", default=list(KAPPAS), help="lead-lag kappas (0: placebo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="market seeds")
    parser.add_argument("--json", default="benchmarks/results/lead_lag_calibration.json", help="'' writes nothing")
    args = parser.parse_args()
    config = EnvConfig()
    t0 = time.time()
    planted = [planted_piece(seed, config) for seed in args.seeds]
    pieces = [lead_lag_piece(kappa, seed, config) for kappa in args.kappas for seed in args.seeds]
    text = table(pieces, planted)
    command = "python benchmarks/bench_lead_lag.py --kappas " + " ".join(f"{k:g}" for k in args.kappas)
    command += " --seeds " + " ".join(str(s) for s in args.seeds)
    record = {
        "benchmark": "lead_lag_calibration",
        "command": command,
        "market": MARKET,
        "closest_kappa_to_planted_ceiling": closest_kappa(pieces, planted) if any(args.kappas) else None,
        "wall_s": time.time() - t0,
        "table": text,
        "lead_lag": pieces,
        "planted": planted,
    }
    write_json(args.json or None, record)
    print(text)


if __name__ == "__main__":
    main()
