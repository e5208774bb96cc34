"""The judge: metrics (daily Sharpe, its robust error, PSR / DSR), backtests, the symbol agents' and the master's
baselines, the go criterion and the directive analysis, each against a hand computation on a small market."""

from __future__ import annotations

import json
import math
from statistics import NormalDist
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import backtest as bt
import trading_env as te
from market_data import CROSS_SECTION_NAMES, make_synthetic_prepared
from market_data import random_walk_market as make_market


def test_performance_metrics():
    equity = np.array([100.0, 110.0, 99.0, 99.0, 120.0])
    days = np.datetime64("2024-01-01", "D") + np.arange(5)  # one mark a day: daily returns are the bar returns
    m = bt.performance_metrics(equity, days.astype("datetime64[ns]"), bars_per_year=4, bars_per_day=1)
    r = equity[1:] / equity[:-1] - 1
    assert m["total_return"] == pytest.approx(0.2) and m["cagr"] == pytest.approx(0.2)
    assert m["sharpe"] == pytest.approx(r.mean() / r.std(ddof=1) * 2) == pytest.approx(m["sharpe_bar"])
    assert m["sortino"] == pytest.approx(r.mean() / math.sqrt(np.mean(np.minimum(r, 0) ** 2)) * 2)
    assert m["max_drawdown"] == pytest.approx(99 / 110 - 1) and m["max_drawdown_bars"] == 2
    assert m["calmar"] == pytest.approx(0.2 / (1 - 99 / 110))
    assert m["days"] == 4 and m["days_per_year"] == 4


def test_daily_returns_compound_the_bars_of_each_day():
    ts = np.array(
        ["2024-01-01T14", "2024-01-01T15", "2024-01-01T16", "2024-01-02T14", "2024-01-02T15", "2024-01-03T14"],
        dtype="datetime64[ns]",
    )
    equity = np.array([100.0, 101.0, 99.0, 104.0, 102.0, 103.0])
    dates, r = bt.daily_returns(equity, ts)
    np.testing.assert_array_equal(dates, np.array(["2024-01-01", "2024-01-02", "2024-01-03"], "datetime64[D]"))
    np.testing.assert_allclose(r, [99 / 100 - 1, 102 / 99 - 1, 103 / 102 - 1])
    dates, r = bt.daily_returns(equity[2:], ts[2:])  # the first day holds only the initial mark: no return on it
    np.testing.assert_allclose(r, [102 / 99 - 1, 103 / 102 - 1])


def test_sharpe_from_daily_returns_is_not_inflated_by_autocorrelated_bars():
    """An intraday book whose bar returns are autocorrelated (lag-1 +0.5): the per-bar Sharpe x sqrt(bars a year)
    overstates what its daily returns show; the daily Sharpe matches the daily series' own, and the robust error is
    Lo's iid one when daily returns are independent."""
    rng = np.random.default_rng(0)
    bars, per_day = 7 * 4000, 7
    e = rng.normal(size=bars)
    x = np.empty(bars)
    x[0] = e[0]
    for i in range(1, bars):
        x[i] = 0.5 * x[i - 1] + e[i]
    r = 1e-3 * (0.05 + x * np.sqrt(0.75))
    equity = 100.0 * np.r_[1.0, np.cumprod(1.0 + r)]
    ts = np.datetime64("2020-01-01T14", "h") + np.arange(bars + 1) // per_day * 24 + np.arange(bars + 1) % per_day
    m = bt.performance_metrics(equity, ts.astype("datetime64[ns]"), bars_per_year=7 * 252, bars_per_day=per_day)
    assert m["bar_autocorr"] == pytest.approx(0.5, abs=0.03)
    assert m["sharpe_bar"] > 1.4 * m["sharpe"]  # sqrt((1 + rho) / (1 - rho)) = 1.73 in the limit of long days
    _, daily = bt.daily_returns(equity, ts.astype("datetime64[ns]"))
    assert m["sharpe"] == pytest.approx(daily.mean() / daily.std(ddof=1) * np.sqrt(252))
    iid = np.sqrt((1 + 0.5 * (daily.mean() / daily.std()) ** 2) / len(daily)) * np.sqrt(252)
    assert m["sharpe_se"] == pytest.approx(iid, rel=0.15)


def test_sharpe_hac_se_reduces_to_lo_and_widens_under_autocorrelation():
    rng = np.random.default_rng(1)
    r = 0.001 + 0.01 * rng.normal(size=20000)
    sr = r.mean() / r.std()
    assert bt.sharpe_hac_se(r) == pytest.approx(np.sqrt((1 + sr**2 / 2) / len(r)), rel=0.05)
    ar = np.empty_like(r)
    ar[0] = r[0]
    for i in range(1, len(r)):
        ar[i] = 0.5 * ar[i - 1] + r[i] - 0.001 + 0.0005
    # positively autocorrelated returns: the Sharpe's long-run variance is (1 + rho) / (1 - rho) = 3x the iid one
    iid = np.sqrt((1 + (ar.mean() / ar.std()) ** 2 / 2) / len(ar))
    assert bt.sharpe_hac_se(ar) / iid == pytest.approx(np.sqrt(3), rel=0.15)


def test_probabilistic_and_deflated_sharpe():
    rng = np.random.default_rng(2)
    r = 0.0005 + 0.01 * rng.normal(size=1000)
    sr = r.mean() / r.std()
    assert bt.probabilistic_sharpe(r) == pytest.approx(NormalDist().cdf(sr * np.sqrt(999)), abs=0.01)
    assert bt.probabilistic_sharpe(np.zeros(10)) is None
    assert bt.expected_max_sharpe([1.0]) == 0.0
    trials = rng.normal(size=50)  # the best of 50 unskilled trials: about 2.2 standard deviations up
    assert bt.expected_max_sharpe(trials) == pytest.approx(2.25 * trials.std(ddof=1), rel=0.05)
    assert bt.probabilistic_sharpe(r, bt.expected_max_sharpe(trials) / 100) < bt.probabilistic_sharpe(r)


def test_buy_and_hold_charges_the_entry_costs_and_scales_to_an_exposure():
    market = make_market(T=300, S=3, seed=2)
    cfg = te.EnvConfig(commission_bps=10.0, spread_bps=1.0)
    c = 11e-4
    full = bt.buy_and_hold(market, 230, 10, 1000.0, cfg)
    bench, vc, first = market.data.benchmark[230:241], market.valuation_close[230:241], market.data.open[231]
    np.testing.assert_allclose(full["benchmark"][0], np.r_[1000.0, 1000.0 * (1 - c) * bench[1:] / bench[1]])
    basket = np.r_[1000.0, (1000.0 / 3 * (1 - c) / first * vc[1:]).sum(1)]  # bought at the first fill, open[231]
    np.testing.assert_allclose(full["equal_weight"][0], basket)
    half = bt.buy_and_hold(market, 230, 10, 1000.0, cfg, fraction=0.25)
    np.testing.assert_allclose(half["benchmark"][0][1:], 750.0 + 250.0 * (1 - c) * bench[1:] / bench[1])
    assert 0.2 < half["equal_weight"][1].mean() < 0.3 and half["benchmark"][1].shape == (10,)


def test_equal_weight_basket_sells_a_delisted_symbol_at_its_last_close():
    market = make_market(T=300, S=2, seed=3)
    market.data.close[235:, 1] = np.nan  # symbol 1 ends at bar 234
    market.valuation_close[235:, 1] = market.valuation_close[234, 1]
    cfg = te.EnvConfig(commission_bps=10.0, spread_bps=0.0)
    eq, _ = bt.buy_and_hold(market, 230, 10, 1000.0, cfg)["equal_weight"]
    sh = 500.0 * 0.999 / market.data.open[231]
    cash_after = sh[1] * market.valuation_close[234, 1] * 0.999  # sold at the last close, paying commission again
    np.testing.assert_allclose(eq[6:], cash_after + sh[0] * market.valuation_close[236:241, 0])


@pytest.mark.parametrize("mode", ["independent", "portfolio"])
def test_run_backtest_books_the_sweep(mode):
    market = make_market(T=300, S=3, seed=2)
    config = te.EnvConfig()
    calls = []

    def directive(obs, core, last_actions):
        calls.append(last_actions.copy())
        return np.array([te.NEUTRAL_DIRECTIVE])

    report = bt.run_backtest(
        bt.random_policy(0),
        market,
        "val",
        config,
        seed=0,
        mode=mode,
        master=directive if mode == "portfolio" else None,
        interval=7,
    )
    book = config.initial_capital * (3 if mode == "independent" else 1)
    curve, n = report["curve"], report["agent"]["bars"]
    assert n == 260 - 230 - 1 and curve[0] == book and len(curve) == n + 1  # the last bar is never decided on
    assert report["agent"]["trades"] > 0 and 0 <= report["agent"]["exposure"] <= 1
    assert report["agent"]["costs_frac"] == pytest.approx(report["agent"]["costs"] / book)
    assert report["series"]["pnl"].shape == (n, 3) and len(report["series"]["timestamps"]) == n + 1
    np.testing.assert_allclose(report["series"]["pnl"].sum(), curve[-1] - curve[0], rtol=1e-9)
    if mode == "portfolio":
        assert len(calls) == math.ceil(n / 7) and report["agent"]["directive_most_used"] == te.NEUTRAL_DIRECTIVE
    else:
        with pytest.raises(ValueError, match="portfolio"):
            bt.run_backtest(bt.random_policy(0), market, "val", config, seed=0, master=directive)
    table = bt.format_report({"agent": report["agent"]}, "val")
    assert table.startswith("| val | agent |") and "| win_rate |" in table and "| sharpe_se |" in table


def feature_policy(obs):
    """Deterministic symbol agents: BUY_SMALL while technical feature 0 > 0 (when allowed), else SELL_ALL (when
    allowed), else HOLD."""
    x, mask = obs["technical"][..., -1, 0], obs["action_mask"]
    buy = np.where(mask[..., te.BUY_SMALL] == 1, te.BUY_SMALL, te.HOLD)
    return np.where(x > 0, buy, np.where(mask[..., te.SELL_ALL] == 1, te.SELL_ALL, te.HOLD))


def cycling_policy(obs):
    """Deterministic symbol agents: BUY_SMALL when allowed, else SELL_ALL when allowed, else HOLD."""
    mask = obs["action_mask"]
    return np.where(mask[..., te.BUY_SMALL], te.BUY_SMALL, np.where(mask[..., te.SELL_ALL], te.SELL_ALL, te.HOLD))


def master_market(T: int = 300, seed: int = 1):
    """A 3-symbol random-walk market with what the master's baselines read: a vol_level regime feature, hand-made
    cross-section features (name -> (T,)) and hidden edge labels in whole days of 7 bars whose first bar is a
    decision bar of the train sweep (it starts at bar 30)."""
    market = make_market(T=T, S=3, seed=seed)
    market.regime_names = ["vol_level"] + [f"regime_{k}" for k in range(9)]
    rng = np.random.default_rng(seed)
    features = {name: rng.normal(size=T) for name in CROSS_SECTION_NAMES}
    day = (np.arange(T) + 5) // 7  # a new day at bars 2, 9, ..., 30, 37, ...
    market.data.edge_labels = (rng.random(day[-1] + 1) < 0.4)[day].astype(np.int8)
    return market, features


def test_sweep_backtests_match_run_backtest_env_by_env():
    """One lockstep sweep of 5 masters (4 constant directives and a switching rule) gives, env by env, run_backtest's
    curve, exposure, directives, trades, costs and metrics with that master alone; every env starts at the split's
    first bar and runs to its last."""
    market, features = master_market()
    config = te.EnvConfig()
    switch = bt.switch_chooser(features["avg_corr_2d"][:, None], 0, 1.0, 0.0, 3, 40)
    masters = [bt.fixed_directive(k) for k in (0, 17, te.NEUTRAL_DIRECTIVE, 47)] + [switch]
    sweep = bt.sweep_backtests(feature_policy, market, "train", config, 0, 7, bt.stack_choosers(masters), 5)
    core = te.VecTradingCore(market, 1, "train", "portfolio", config, sequential=True)
    n = core.split_last - core.split_start
    assert sweep["start"] == core.split_start and sweep["curves"].shape == (5, n + 1)
    assert sweep["exposure"].shape == sweep["directives"].shape == (5, n)
    metrics = bt.sweep_metrics(sweep, market)
    for e, master in enumerate(masters):
        one = bt.run_backtest(feature_policy, market, "train", config, 0, "portfolio", master, 7)
        np.testing.assert_allclose(sweep["curves"][e], one["curve"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(sweep["exposure"][e], one["series"]["exposure"], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(sweep["directives"][e], one["series"]["directives"])
        assert sweep["trades"][e] == one["agent"]["trades"]
        for key in ("sharpe", "max_drawdown", "exposure", "turnover", "costs"):
            assert metrics[e][key] == pytest.approx(one["agent"][key], rel=1e-9, abs=1e-12), key
    np.testing.assert_array_equal(sweep["timestamps"], one["series"]["timestamps"])
    assert set(np.unique(sweep["directives"][4])) == {3, 40}  # the rule did switch
    assert len(np.unique(sweep["curves"][:4, -1])) == 4  # the constant directives differ in effect


def perturb(market, features: dict, bars: np.ndarray, seed: int = 9) -> None:
    """Change every price, volume and observed array, every cross-section feature and the hidden label on `bars`."""
    rng = np.random.default_rng(seed)
    d = market.data
    scale = rng.uniform(0.8, 1.2, size=(len(bars), 1))
    for x in (d.open, d.high, d.low, d.close, market.valuation_close):
        x[bars] *= scale
    d.benchmark[bars] *= scale[:, 0]
    d.volume[bars] *= 2.0
    market.technical[bars] = -market.technical[bars]
    market.regime[bars] = np.abs(rng.normal(size=market.regime[bars].shape))
    for x in features.values():
        x[bars] = rng.normal(size=len(bars))
    d.edge_labels[bars] = 1 - d.edge_labels[bars]


def test_master_baselines_are_fitted_on_the_train_split_only():
    """fit_master_baselines (the constants, both threshold rules, the volatility target, the oracle) reads nothing
    after the train split: changing every later bar, feature and label leaves its JSON unchanged; changing the train
    bars changes it. Without costs, on this market, the best constant is not the least-exposure one: the threshold
    rules do switch."""
    config = te.EnvConfig(commission_bps=0.0, spread_bps=0.0, impact_coef=0.0)
    market, features = master_market(seed=3)
    fitted = bt.fit_master_baselines(feature_policy, market, config, 0, 7, features=features)
    assert json.loads(json.dumps(fitted)) == fitted  # plain JSON
    assert fitted["fixed"]["best"] != fitted["fixed"]["defensive"]
    defensive = fitted["fixed"]["defensive"]  # the least exposure: a flat (risk 0) directive, which never buys
    assert te.directive_values(defensive)[0] == 0.0 and fitted["fixed"]["exposures"][defensive] == 0.0
    assert set(fitted) == {"split", "interval", "fixed", "vol_target", "corr_rule", "reactive_rule", "oracle"}
    assert fitted["corr_rule"]["feature"] == "avg_corr_2d" and fitted["reactive_rule"]["feature"] == "xs_autocorr_1d"
    assert len(fitted["fixed"]["sharpes"]) == te.NUM_DIRECTIVES and len(fitted["corr_rule"]["candidates"]) == 12
    fixed = fitted["fixed"]
    assert fixed["sharpes"][fixed["best"]] == max(fixed["sharpes"])
    assert fixed["exposures"][fixed["defensive"]] == min(fixed["exposures"])
    assert fitted["oracle"]["sharpe"] >= fixed["best_sharpe"]  # d* itself is one of the oracle's candidates
    hi = market.splits["train"][1]
    perturb(market, features, np.arange(hi, 300))
    assert bt.fit_master_baselines(feature_policy, market, config, 0, 7, features=features) == fitted
    perturb(market, features, np.arange(30, hi))
    assert bt.fit_master_baselines(feature_policy, market, config, 0, 7, features=features) != fitted
    # each fit alone agrees with the combined one
    rule = bt.fit_threshold_rule(feature_policy, market, config, 0, 7, "avg_corr_2d", features=features)
    refit = bt.fit_master_baselines(feature_policy, market, config, 0, 7, features=features)
    assert rule == refit["corr_rule"]
    assert bt.fit_oracle(feature_policy, market, config, 0, 7, fixed=refit["fixed"]) == refit["oracle"]
    market.data.edge_labels = None
    assert "oracle" not in bt.fit_master_baselines(feature_policy, market, config, 0, 7, features=features)


def test_oracle_and_rules_read_the_decision_bar():
    """The oracle plays d_R where the hidden label at the decision bar is R and d_M elsewhere, and holds it until the
    next decision; a threshold rule reads its feature at the decision bar."""
    market, features = master_market()
    labels = market.data.edge_labels = (np.random.default_rng(3).random(300) < 0.5).astype(np.int8)  # bar by bar
    choose = bt.oracle_chooser({"d_M": 40, "d_R": 2}, labels)
    sweep = bt.sweep_backtests(feature_policy, market, "train", te.EnvConfig(), 0, 7, choose, 2)
    n = sweep["directives"].shape[1]
    steps = np.arange(0, n, 7)
    decided = np.where(labels[sweep["start"] + steps] == 1, 2, 40)
    np.testing.assert_array_equal(sweep["directives"], np.broadcast_to(np.repeat(decided, 7)[:n], (2, n)))
    rule = {"feature": "avg_corr_2d", "direction": -1.0, "threshold": 0.5, "on": 0, "off": 28}
    core = SimpleNamespace(t=np.array([40, 41, 42]), num_envs=3)
    x = features["avg_corr_2d"][[40, 41, 42]]
    np.testing.assert_array_equal(bt.threshold_chooser(rule, features)(None, core, None), np.where(-x > 0.5, 0, 28))


def edge_market(T: int = 700, mu: float = 0.004, seed: int = 0):
    """3 symbols that trend up in state M and down in state R (spells of 3 days starting at decision bars): a policy
    long half of the time earns in M and loses in R. Its avg_corr_2d is the label plus noise (it announces R)."""
    rng = np.random.default_rng(seed)
    market = make_market(T=T, S=3, seed=seed, splits={"train": (30, 520), "val": (544, 600), "test": (624, T)})
    market.regime_names = ["vol_level"] + [f"regime_{k}" for k in range(9)]
    spell = (np.arange(T) + 12) // 21  # a new spell at bars 30, 51, ...
    labels = (rng.random(spell[-1] + 1) < 0.4)[spell].astype(np.int8)
    r = np.where(labels == 1, -mu, mu)[:, None] + 0.002 * rng.normal(size=(T, 3))
    close = 100.0 * np.exp(np.cumsum(r, axis=0))
    d = market.data
    d.close, d.open = close, np.r_[close[:1], close[:-1]]  # open[t+1] = close[t]
    d.high, d.low = np.maximum(d.open, close) * 1.001, np.minimum(d.open, close) * 0.999
    d.benchmark, d.edge_labels, market.valuation_close = close.mean(1), labels, close.copy()
    features = {name: rng.normal(size=T) for name in CROSS_SECTION_NAMES}
    features["avg_corr_2d"] = labels + 0.3 * rng.normal(size=T)
    return market, features


def test_oracle_cuts_exposure_in_the_state_where_the_agents_lose():
    market, features = edge_market()
    config = te.EnvConfig(commission_bps=0.0, spread_bps=0.0, impact_coef=0.0)
    fixed = bt.fit_fixed_directive(cycling_policy, market, config, 0, 7)
    oracle = bt.fit_oracle(cycling_policy, market, config, 0, 7, fixed=fixed)
    exposure = fixed["exposures"]
    assert exposure[oracle["d_R"]] < exposure[oracle["d_M"]] and oracle["sharpe"] > fixed["best_sharpe"]
    assert oracle["sharpes_R"][oracle["d_R_search"]] == max(oracle["sharpes_R"]) and oracle["start"] == fixed["best"]
    # the correlation rule on a feature that announces R turns defensive above its threshold
    assert fixed["best"] != fixed["defensive"]
    rule = bt.fit_threshold_rule(cycling_policy, market, config, 0, 7, "avg_corr_2d", fixed=fixed, features=features)
    assert rule["direction"] == 1.0 and rule["sharpe"] > fixed["best_sharpe"]
    assert (rule["on"], rule["off"]) == (fixed["defensive"], fixed["best"])


def test_master_backtests_share_policy_capital_and_match_exposure():
    market, features = master_market()
    config = te.EnvConfig()
    fitted = bt.fit_master_baselines(feature_policy, market, config, 0, 7, features=features)
    master = bt.fixed_directive(bt.DEFENSIVE_DIRECTIVE)
    reports, results, same = bt.master_backtests(feature_policy, master, market, "test", config, 0, 7, fitted, features)
    assert same is fitted
    assert set(reports) == set(results) == {
        "master", "best_constant", "neutral", "vol_target", "corr_rule", "reactive_rule", "oracle", "defensive",
        "best_constant_matched", "neutral_matched", "benchmark_bh", "equal_weight_bh",
    }  # fmt: skip
    book = results["master"]["curve"][0]
    assert all(r["curve"][0] == pytest.approx(book) for r in results.values())  # the same capital
    assert all(len(r["curve"]) == len(results["master"]["curve"]) for r in results.values())  # the same bars
    # the master (run_backtest) and the same directive in the sweep give the same book
    np.testing.assert_allclose(results["defensive"]["curve"], results["master"]["curve"], rtol=0, atol=1e-9)
    # on a random walk with costs every trading directive loses on train: the best constant is flat (risk 0), and
    # its exposure-matched book stays flat (cash cannot be scaled up)
    assert reports["best_constant"]["exposure"] == 0.0 and te.directive_values(fitted["fixed"]["best"])[0] == 0.0
    flat = results["best_constant_matched"]["curve"]
    assert (flat == flat[0]).all() and reports["best_constant_matched"]["exposure"] == 0.0
    for name in ("neutral",):  # scaled to the master's exposure: plain de-leveraging
        lev = reports["master"]["exposure"] / reports[name]["exposure"]
        assert reports[f"{name}_matched"]["exposure"] == pytest.approx(reports["master"]["exposure"])
        base, matched = results[name]["curve"], results[f"{name}_matched"]["curve"]
        np.testing.assert_allclose(np.diff(matched) / matched[:-1], lev * np.diff(base) / base[:-1], rtol=1e-9)
    assert reports["master"]["costs"] > 0 and reports["neutral"]["costs"] > reports["master"]["costs"]
    assert "exposure" in results["oracle"]["series"] and "series" not in results["best_constant_matched"]
    # fitted inside on the train split when not given: the same baselines
    assert bt.master_backtests(feature_policy, master, market, "test", config, 0, 7, None, features)[2] == fitted


def test_go_criterion_by_hand():
    """Three daily books that share most of their noise: the go criterion, the paired Sharpe margin against a plain
    loop of the Newey-West formula, and the oracle's preflight."""
    rng = np.random.default_rng(0)
    n = 500
    ts = (np.datetime64("2024-01-01", "D") + np.arange(n + 1)).astype("datetime64[ns]")
    calendar = SimpleNamespace(data=SimpleNamespace(bars_per_year=252.0, bars_per_day=1.0))
    common = 0.01 * rng.normal(size=n)
    book = lambda mu, sd: 100.0 * np.r_[1.0, np.cumprod(1.0 + mu + common + sd * rng.normal(size=n))]  # noqa: E731
    curves = {"best_constant": book(0.0004, 0.001), "master": book(0.0008, 0.002), "oracle": book(0.0015, 0.001)}
    reports = {name: bt.performance_metrics(c, ts, 252.0, 1.0) | {"exposure": 0.1} for name, c in curves.items()}
    dd = reports["master"]["max_drawdown"]
    reports |= {name: {"sharpe": 0.0, "max_drawdown": -0.5, "exposure": 0.1}
                for name in ("vol_target", "corr_rule", "reactive_rule", "neutral_matched")}  # fmt: skip
    reports["best_constant_matched"] = {"sharpe": 0.0, "max_drawdown": dd / 0.8, "exposure": 0.1}  # 20% deeper
    go = bt.master_go_criterion(reports, curves, ts, calendar)
    assert go["go"] and go["passed"] and go["sharpe_passed"] and go["drawdown_passed"]
    assert go["drawdown_cut_vs_matched_best_constant"] == pytest.approx(0.2)
    margin = reports["master"]["sharpe"] - reports["best_constant"]["sharpe"]
    assert go["margin_vs_best_constant"] == pytest.approx(margin)
    _, ra = bt.daily_returns(curves["master"], ts)
    _, rb = bt.daily_returns(curves["best_constant"], ts)
    d = ra / ra.std(ddof=1) - rb / rb.std(ddof=1)
    u, lags = d - d.mean(), int(4 * (n / 100) ** (2 / 9))
    lrv = sum(u[t] ** 2 for t in range(n)) / n
    for lag in range(1, lags + 1):
        lrv += 2 * (1 - lag / (lags + 1)) * sum(u[t] * u[t - lag] for t in range(lag, n)) / n
    assert go["margin_se"] == pytest.approx(math.sqrt(lrv / n) * math.sqrt(252))
    # pairing removes the shared noise: far below the error of two independent Sharpes
    assert go["margin_se"] < 0.5 * math.hypot(reports["master"]["sharpe_se"], reports["best_constant"]["sharpe_se"])
    gain = reports["oracle"]["sharpe"] - reports["best_constant"]["sharpe"]
    assert go["oracle_gain"] == pytest.approx(gain) and go["oracle_gain_se"] > 0
    assert go["oracle_preflight_ok"] == (gain >= go["oracle_gain_se"]) and go["oracle_preflight_ok"]
    assert go["master_share_of_oracle_gain"] == pytest.approx(go["margin_vs_best_constant"] / gain)
    assert "passed" in bt.format_go_criterion(go) and "preflight ok" in bt.format_go_criterion(go)
    # a threshold rule above the master fails (a); the exposure-matched best constant itself fails (b); no oracle
    reports["corr_rule"]["sharpe"] = reports["master"]["sharpe"] + 0.01
    go = bt.master_go_criterion(reports, curves, ts, calendar)
    assert not go["sharpe_passed"] and go["drawdown_passed"] and not go["go"]
    reports["corr_rule"]["sharpe"] = 0.0
    reports["best_constant_matched"]["max_drawdown"] = dd
    go = bt.master_go_criterion(reports, {k: v for k, v in curves.items() if k != "oracle"}, ts, calendar)
    assert go["sharpe_passed"] and not go["drawdown_passed"] and not go["go"]
    assert go["oracle_gain"] is None and go["oracle_preflight_ok"] is None
    assert "oracle" not in bt.format_go_criterion(go)
    with pytest.raises(ValueError, match="corr_rule"):
        bt.master_go_criterion({k: v for k, v in reports.items() if k != "corr_rule"}, curves, ts, calendar)


def test_vol_target_rule_cuts_risk_when_volatility_rises():

    market = make_synthetic_prepared(num_symbols=3, years=0.5, seed=1)
    rule = bt.fit_vol_target(market)
    lo, hi = market.splits["train"]
    j = market.regime_names.index("vol_level")
    assert rule["target_vol"] == pytest.approx(np.median(market.regime[lo:hi, j][market.regime[lo:hi, j] > 0]))
    core = te.VecTradingCore(market, 2, mode="portfolio", seed=0)
    obs = core.reset(seed=0)
    obs["regime"][0, :, j], obs["regime"][1, :, j] = rule["target_vol"] * 2.0, rule["target_vol"] * 0.8
    risk = np.unravel_index(bt.vol_target_directive(rule, j)(obs, core, None), te.DIRECTIVE_SHAPE)[0]
    assert te.RISK_MULTIPLIERS[risk[0]] == 0.5 and te.RISK_MULTIPLIERS[risk[1]] == 1.25


def test_directive_analysis_groups_by_the_hidden_regime():

    market = make_synthetic_prepared(num_symbols=3, years=1.0, seed=5, regime_foresight=0.5)
    lo, hi = market.splits["train"]
    t = np.arange(lo, hi - 1)
    labels = market.data.regime_labels[t]
    directives = np.where(labels == 0, te.NEUTRAL_DIRECTIVE, bt.DEFENSIVE_DIRECTIVE)  # risk 0.5 outside bull
    series = {"directives": directives, "start": lo, "exposure": np.where(labels == 0, 0.2, 0.05)}
    why = bt.directive_analysis(series, market)
    assert why["bars"] == len(t) and why["by_regime"]["bull"]["risk_multiplier"] == 1.0
    downturn = [k for k in ("bear", "crisis") if k in why["by_regime"]]
    assert downturn and all(why["by_regime"][k]["risk_multiplier"] == 0.5 for k in downturn)
    assert why["by_regime"]["bull"]["exposure"] == pytest.approx(0.2)
    assert "warning" in why["by_regime"] and set(why["risk_multiplier_corr"]) == set(market.regime_names)


def test_directive_analysis_by_hidden_edge_state():
    """P(defensive | R) and P(defensive | M) over the decision bars (defensive: risk below 1.0 or the defensive
    regime mode; or below a reference directive's), and the mean risk multiplier and exposure per edge state; nothing
    of it without edge labels."""
    market, _ = master_market()
    lo, hi = market.splits["train"]
    n = hi - 1 - lo
    labels = market.data.edge_labels  # whole days that start at decision bars: the state is constant between them
    state = labels[lo + np.arange(n)]
    cautious = int(np.ravel_multi_index((2, 1, 0), te.DIRECTIVE_SHAPE))  # risk 1.0, but the defensive regime mode
    decided = np.where(labels[lo + np.arange(0, n, 7)] == 1, bt.DEFENSIVE_DIRECTIVE, te.NEUTRAL_DIRECTIVE)
    series = {"directives": np.repeat(decided, 7)[:n], "start": lo, "interval": 7,
              "exposure": np.where(state == 1, 0.05, 0.2)}  # fmt: skip
    why = bt.directive_analysis(series, market)
    by = why["by_edge_state"]
    assert why["p_defensive_given_R"] == 1.0 and why["p_defensive_given_M"] == 0.0
    assert by["R"]["decisions"] + by["M"]["decisions"] == len(decided) and by["R"]["bars"] == (state == 1).sum()
    assert by["R"]["risk_multiplier"] == 0.5 and by["M"]["risk_multiplier"] == 1.0
    assert by["R"]["exposure"] == pytest.approx(0.05) and by["M"]["exposure"] == pytest.approx(0.2)
    series["directives"] = np.where(series["directives"] == te.NEUTRAL_DIRECTIVE, cautious, bt.DEFENSIVE_DIRECTIVE)
    assert bt.directive_analysis(series, market)["p_defensive_given_M"] == 1.0
    # relative to a reference (the best constant): a master pinned to a defensive anchor is defensive only below it
    anchor = int(np.ravel_multi_index((4, 0, 0), te.DIRECTIVE_SHAPE))  # risk 1.25, cap 5%, defensive mode
    flat = int(np.ravel_multi_index((0, 0, 0), te.DIRECTIVE_SHAPE))
    series["directives"] = np.repeat(np.where(labels[lo + np.arange(0, n, 7)] == 1, flat, anchor), 7)[:n]
    assert bt.directive_analysis(series, market)["p_defensive_given_M"] == 1.0  # absolute: always defensive
    why = bt.directive_analysis(series, market, reference=anchor)
    assert why["p_defensive_given_R"] == 1.0 and why["p_defensive_given_M"] == 0.0
    assert why["defensive_reference"] == anchor
    market.data.edge_labels = None
    assert "by_edge_state" not in bt.directive_analysis(series, market)


def test_directive_figure_shades_the_hidden_R_periods():
    market, _ = master_market()
    lo, n = market.splits["train"][0], 50
    series = {"timestamps": market.data.timestamps[lo : lo + n + 1], "start": lo,
              "directives": np.full(n, te.NEUTRAL_DIRECTIVE)}  # fmt: skip
    shade = "hidden state R (after the fact)"
    fig = bt.directive_figure(series, market, "test")
    assert shade in [c.get_label() for c in fig.axes[0].collections]
    market.data.edge_labels = None
    fig2 = bt.directive_figure(series, market, "test")
    assert shade not in [c.get_label() for c in fig2.axes[0].collections]
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(fig2)


def test_master_final_report_fits_once_and_the_stress_rows_reuse_it(tmp_path, monkeypatch):
    """The baselines are fitted once on the train split and every stress row (the latency row included: its
    stateful wrapper starts afresh in each run) reuses them; a given `fitted` is never refitted."""
    market, features = master_market()
    calls, fit = [], bt.fit_master_baselines

    def counted(*args, **kwargs):
        calls.append(args[4:])
        return fit(*args, **kwargs | {"features": features})

    monkeypatch.setattr(bt, "fit_master_baselines", counted)
    monkeypatch.setattr(bt, "cross_section_signals", lambda m, f=None: features)
    writer = SimpleNamespace(add_scalar=lambda *args: None)
    make_master = lambda: bt.fixed_directive(0)  # noqa: E731
    out = bt.master_final_report(feature_policy, make_master, market, "test", te.EnvConfig(), 0, 7, True, tmp_path,
                                 writer)  # fmt: skip
    assert len(calls) == 1 and set(out) == {"reports", "results", "go", "why", "stress", "fitted"}
    assert "oracle" in out["fitted"] and out["go"]["oracle_gain"] is not None and "by_edge_state" in out["why"]
    rows = out["stress"]
    assert [r["scenario"] for r in rows][:5] == ["costs_x2", "costs_x3", "impact_x5", "latency_1_bar", "crisis_replay"]
    assert all({"master", "best_constant", "corr_rule", "oracle"} <= set(r["reports"]) for r in rows)
    assert (tmp_path / "backtest.json").is_file() and (tmp_path / "test_bars.parquet").is_file()
    again = bt.master_final_report(feature_policy, make_master, market, "test", te.EnvConfig(), 0, 7, False, tmp_path,
                                   writer, fitted=out["fitted"])  # fmt: skip
    assert len(calls) == 1 and again["reports"] == out["reports"]


def test_the_last_bar_of_a_sweep_records_its_exposure():
    """info["holdings"] was an alias of an array that the end-of-sweep reset zeroes: the last bar read 0."""
    market = make_market(T=300, S=3, seed=4)
    buy = lambda obs: np.where(obs["action_mask"][..., te.BUY_LARGE] == 1, te.BUY_LARGE, te.HOLD)  # noqa: E731
    report = bt.run_backtest(buy, market, "test", te.EnvConfig(), seed=0)
    exposure = report["series"]["exposure"]
    assert exposure[-2] > 0.05 and exposure[-1] == pytest.approx(exposure[-2], rel=0.2)


def test_stitching_compounds_a_day_that_two_folds_share():
    """Hourly folds whose block boundary falls inside a session both report that day: the stitched record
    compounds the two parts once, keeps every other day as it is, and keeps the days in order."""
    day = lambda d: pd.Timestamp(f"2024-01-0{d}")  # noqa: E731
    a = pd.DataFrame({"agent": [0.01, 0.02]}, index=pd.DatetimeIndex([day(1), day(2)], name="date"))
    b = pd.DataFrame({"agent": [0.03, -0.01]}, index=pd.DatetimeIndex([day(2), day(3)], name="date"))
    stitched = bt.stitch_daily_returns([a, b])
    np.testing.assert_allclose(stitched["agent"], [0.01, 1.02 * 1.03 - 1, -0.01])
    assert list(stitched.index) == [day(1), day(2), day(3)]
    with pytest.raises(RuntimeError, match="out of order"):
        bt.stitch_daily_returns([b, a])
