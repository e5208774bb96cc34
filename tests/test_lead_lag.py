"""The lead-lag market (--data.lead-lag KAPPA): followers lead by their sector leader's news, no symbol's own window
predicts it, the placebo (kappa 0) has the same layout and marginals, off is today's market, the leader map is never
observed, the flags are checked, and the cross rule (backtest.fit_cross_rule) is fitted on train only and earns the
lead net of costs where the placebo loses them. Markets of 10 symbols x 10 years are generated in ~0.3 s."""

import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, script_env

import backtest as bt
import market_data as md
from trading_env import BUY_LARGE, BUY_SMALL, HOLD, SELL_ALL, EnvConfig

KAPPA = 0.4
LONG = dict(num_symbols=10, years=10.0, seed=2, signal_strength=0.0)


@pytest.fixture(scope="module")
def long_markets() -> dict[float, md.MarketData]:
    """kappa -> a 10-symbol, 10-year market (17,640 bars): the placebo, half the lead, the lead."""
    return {k: md.generate_synthetic_market(**LONG, lead_lag=k) for k in (0.0, KAPPA / 2, KAPPA)}


def standardised(data: md.MarketData) -> np.ndarray:
    """(T-1, S) log returns over the std of the 70 returns before them (causal), NaN where undefined."""
    r = np.diff(np.log(data.close), axis=0)
    return r / pd.DataFrame(r).rolling(70, min_periods=35).std().shift(1).to_numpy()


def lag1(z: np.ndarray, a: int, b: int) -> float:
    """Correlation of z[t-1, a] with z[t, b] over the bars where both exist."""
    x, y = z[:-1, a], z[1:, b]
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def followers(data: md.MarketData) -> np.ndarray:
    return np.flatnonzero(data.leader_map != np.arange(len(data.leader_map)))


def test_layout_one_leader_per_sector_of_five():
    np.testing.assert_array_equal(md.lead_lag_leaders(10), [0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(md.lead_lag_leaders(1), [0])
    for S in (2, 5, 6, 11, 143):
        leaders = md.lead_lag_leaders(S)
        K = -(-S // md.LEAD_LAG_SECTOR_SIZE)
        assert leaders.dtype == np.int64 and set(leaders) == set(range(K))  # sector k is led by symbol k
        assert np.bincount(leaders).max() <= md.LEAD_LAG_SECTOR_SIZE
        np.testing.assert_array_equal(leaders, np.arange(S) % K)  # the generator's sector of each symbol
    data = md.generate_synthetic_market(num_symbols=6, years=0.2, signal_strength=0.0, lead_lag=0.3)
    np.testing.assert_array_equal(data.leader_map, md.lead_lag_leaders(6))


def test_followers_lead_by_their_leader_and_no_window_predicts_itself(long_markets):
    """Lag-1 correlation of causally standardised returns, tolerances in standard errors (n bars): leader ->
    follower ~ kappa x the leader's idiosyncratic share of volatility (~0.8: the lead loads on the leader's own
    news, not on the market and sector shocks in its return) and proportional to kappa; every symbol's own lag-1
    autocorrelation ~0; no other symbol predicts a follower, and a follower does not predict its leader (the lead
    runs forward in time only)."""
    data = long_markets[KAPPA]
    z = standardised(data)
    bound = 5.0 / np.sqrt(len(z))  # 0.038: ~4 standard errors of one correlation (~1.2 / sqrt(n): fat tails)
    lead = {f: lag1(z, data.leader_map[f], f) for f in followers(data)}
    assert len(lead) == 8 and all(0.65 * KAPPA < c < 0.9 * KAPPA for c in lead.values()), lead
    half = np.mean([lag1(standardised(long_markets[KAPPA / 2]), data.leader_map[f], f) for f in lead])
    assert 1.7 < np.mean(list(lead.values())) / half < 2.3
    own = [lag1(z, s, s) for s in range(10)]
    assert max(np.abs(own)) < bound and abs(np.mean(own)) < bound / 2, own
    others = [lag1(z, g, f) for f in lead for g in range(10) if g not in (f, data.leader_map[f])]
    assert max(np.abs(others)) < bound, max(np.abs(others))
    backwards = [lag1(z, f, data.leader_map[f]) for f in lead]
    assert max(np.abs(backwards)) < bound, backwards


def test_placebo_has_the_lead_lag_layout_and_marginals_without_the_lead(long_markets):
    """kappa 0: the same leader map and draws; leaders, benchmark and regimes identical; every follower's variance of
    standardised returns and own autocorrelation as in the lead market; no lead."""
    lead, placebo = long_markets[KAPPA], long_markets[0.0]
    np.testing.assert_array_equal(placebo.leader_map, lead.leader_map)
    for name in ("benchmark", "regime_labels", "timestamps"):
        np.testing.assert_array_equal(getattr(placebo, name), getattr(lead, name))
    chief = lead.leader_map == np.arange(10)
    np.testing.assert_array_equal(placebo.close[:, chief], lead.close[:, chief])
    zl, zp = standardised(lead), standardised(placebo)
    bound = 5.0 / np.sqrt(len(zp))  # ~4 standard errors, as above
    for f in followers(lead):
        assert abs(np.nanvar(zl[:, f]) / np.nanvar(zp[:, f]) - 1.0) < 0.05
        assert abs(lag1(zp, f, f)) < bound and abs(lag1(zl, f, f)) < bound
        assert abs(lag1(zp, lead.leader_map[f], f)) < bound
    assert not np.array_equal(placebo.close[:, ~chief], lead.close[:, ~chief])


def test_off_is_todays_market():
    """lead_lag None (the default) draws and changes nothing: the arrays equal a call without the argument, which
    the generator tests of tests/test_market_data.py pin down, with 11 sectors; no leader map."""
    kw = dict(num_symbols=12, years=0.5, seed=3, gap_rate=0.02, regime_foresight=0.5)
    base, off = md.generate_synthetic_market(**kw), md.generate_synthetic_market(**kw, lead_lag=None)
    for name in ("timestamps", "open", "high", "low", "close", "volume", "tradable", "benchmark", "regime_labels"):
        np.testing.assert_array_equal(getattr(off, name), getattr(base, name))
    assert base.leader_map is None and off.leader_map is None and md.DataConfig().lead_lag is None
    placebo = md.generate_synthetic_market(**kw | {"signal_strength": 0.0}, lead_lag=0.0)
    np.testing.assert_array_equal(placebo.regime_labels, base.regime_labels)  # the same chain: drawn first


def splice(data: md.MarketData, other: md.MarketData, t: int) -> md.MarketData:
    """data's bars up to and including bar t, other's afterwards (the same calendar)."""
    out = {}
    for k in ("open", "high", "low", "close", "volume", "benchmark", "tradable"):
        a = getattr(data, k).copy()
        a[t + 1 :] = getattr(other, k)[t + 1 :]
        out[k] = a
    return replace(data, **out)


def observations(market: md.PreparedMarket, split: str = "val", seed: int = 0) -> list[dict]:
    """Every observation a seeded random policy sees in one backtest sweep of `split`."""
    seen, pick = [], bt.random_policy(seed)

    def act(obs):
        seen.append({k: np.array(v, copy=True) for k, v in obs.items()})
        return pick(obs)

    bt.run_backtest(act, market, split, EnvConfig(), seed)
    return seen


def assert_same_observations(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


CFG = md.DataConfig(num_symbols=10, years=1.0, seed=4, signal_strength=0.0, lead_lag=KAPPA, sl_signals=False,
                    cache=False)  # fmt: skip


def test_leader_map_is_never_observed():
    """The map lives in MarketData only: no PreparedMarket array is named for it, and another map with the same
    bars changes no feature and no observation of the environment (every key, every bar of a sweep)."""
    data = md.load_market(CFG)
    base = md.build_prepared(data, CFG)
    assert not [f.name for f in fields(md.PreparedMarket) if "leader" in f.name]
    other = replace(data, leader_map=np.roll(data.leader_map, 3), regime_labels=None)
    moved = md.build_prepared(other, CFG)
    for name in ("technical", "regime", "sl_probs", "valuation_close"):
        np.testing.assert_array_equal(getattr(moved, name), getattr(base, name))
    np.testing.assert_array_equal(md.cross_section_features(other), md.cross_section_features(data))
    assert_same_observations(observations(moved), observations(base))


def test_what_is_observed_at_bar_t_does_not_depend_on_later_bars():
    """The lead-lag market's features and the environment's observations up to bar t are unchanged when every bar
    after t is replaced (by the placebo's, which shares the calendar)."""
    data = md.load_market(CFG)
    full = md.build_prepared(data, CFG)
    t = full.splits["val"][0] + 40
    spliced = md.build_prepared(splice(data, md.load_market(replace(CFG, lead_lag=0.0)), t), CFG)
    for name in ("technical", "regime", "valuation_close"):
        np.testing.assert_array_equal(getattr(spliced, name)[: t + 1], getattr(full, name)[: t + 1], err_msg=name)
    assert not np.array_equal(spliced.technical[t + 1 :], full.technical[t + 1 :])
    first = t + 1 - full.splits["val"][0]  # a sweep of val observes its bars from the split's first one on
    seen, seen_full = observations(spliced), observations(full)
    assert_same_observations(seen[:first], seen_full[:first])
    assert not np.array_equal(seen[first]["technical"], seen_full[first]["technical"]), "bar t + 1 should differ"


def test_bad_flags_are_named():
    with pytest.raises(md.UserInputError, match=r"--data.lead-lag 1.0 must lie in \[0, 1\); 0 is the placebo"):
        md.check_synthetic_flags(0.0, 0.0, 0.0, lead_lag=1.0)
    with pytest.raises(md.UserInputError, match=r"--data.lead-lag -0.1 must lie in"):
        md.check_data_config(md.DataConfig(signal_strength=0.0, lead_lag=-0.1))
    with pytest.raises(md.UserInputError, match=r"add --data.signal-strength 0"):
        md.generate_synthetic_market(3, 0.5, signal_strength=0.3, lead_lag=0.4)
    with pytest.raises(md.UserInputError, match=r"--data.lead-lag and --data.edge-regime flip are two different"):
        md.check_data_config(md.DataConfig(signal_strength=0.0, lead_lag=0.4, edge_regime="flip"))
    md.check_data_config(md.DataConfig(signal_strength=0.0, lead_lag=0.0))  # the placebo is a valid market


def test_a_bad_flag_stops_the_script_with_one_line_and_exit_2(tmp_path):
    """The likeliest slip, the lead without --data.signal-strength 0: exit 2, one line naming the fix."""
    cmd = [sys.executable, str(ROOT / "ppo_symbol_agent.py"), "--data.lead-lag", "0.45", "--data.years", "0.5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --data.lead-lag 0.45") and "add --data.signal-strength 0" in error, error
    assert not (tmp_path / "runs").exists()


def test_cache_keeps_the_leader_map(tmp_path):
    cfg = replace(CFG, num_symbols=6, years=0.4, cache=True, cache_dir=str(tmp_path))
    built, cached = md.prepare_market(cfg), md.prepare_market(cfg)
    assert cached.data.leader_map.dtype == np.int64
    np.testing.assert_array_equal(cached.data.leader_map, built.data.leader_map)
    np.testing.assert_array_equal(cached.data.close, built.data.close)
    keys = {md.cache_key(replace(cfg, lead_lag=k)) for k in (None, 0.0, KAPPA)}
    assert len(keys) == 3 and md.prepare_market(replace(cfg, lead_lag=None)).data.leader_map is None


def test_data_tag_names_the_lead():
    import experiment as xp

    assert xp.data_tag(CFG) == "synthetic-s0-l0.4-1y-10sym-d4"
    assert xp.data_tag(replace(CFG, lead_lag=0.0)) == "synthetic-s0-l0-1y-10sym-d4"
    assert xp.data_tag(replace(CFG, lead_lag=None)) == "synthetic-s0-1y-10sym-d4"


# The cross rule ------------------------------------------------------------------------------------------------
def test_cross_rule_policy_matches_a_plain_loop():
    """Per slot: a follower buys when its leader's last ret_1 exceeds the leader's threshold and it is flat (and may
    buy), sells all when not and it holds (and may sell); leaders always hold."""
    rng = np.random.default_rng(0)
    S, E = 10, 3
    rule = {"feature": 0, "leader_map": md.lead_lag_leaders(S).tolist(), "thresholds": [0.5, -0.2] + [None] * 8}
    act = bt.cross_rule_policy(rule)
    for _ in range(20):
        obs = {
            "technical": rng.normal(size=(E, S, 24, 23)).astype(np.float32),
            "position": np.where(rng.random((E, S, 5)) < 0.5, 1.0, 0.0).astype(np.float32),
            "action_mask": (rng.random((E, S, 7)) < 0.7).astype(np.int8),
        }
        got = act(obs)
        for e in range(E):
            for s in range(S):
                lead = rule["leader_map"][s]
                on = lead != s and obs["technical"][e, lead, -1, 0] > rule["thresholds"][lead]
                held, mask = obs["position"][e, s, 4] > 0, obs["action_mask"][e, s]
                want = HOLD
                if on and not held and mask[BUY_LARGE]:
                    want = BUY_LARGE
                elif not on and held and mask[SELL_ALL]:
                    want = SELL_ALL
                assert got[e, s] == want, (e, s)


@pytest.fixture(scope="module")
def rule_markets() -> dict[float, md.PreparedMarket]:
    """kappa 0.45 (the calibrated lead) and its placebo, 10 symbols x 4 years: test splits of ~1,000 bars."""
    cfg = replace(CFG, years=4.0, seed=5)
    return {k: md.prepare_market(replace(cfg, lead_lag=k)) for k in (0.0, 0.45)}


def test_cross_rule_is_fitted_on_the_train_split_only(rule_markets):
    """Replacing every bar and feature after the train split changes neither the thresholds nor the map check."""
    market = rule_markets[0.45]
    rule = bt.fit_cross_rule(market, EnvConfig())
    assert rule["map_recovered"] == 1.0 and rule["split"] == "train"
    assert [v is not None for v in rule["thresholds"]] == [True, True] + [False] * 8
    hi = market.splits["train"][1]
    rng = np.random.default_rng(1)
    technical = market.technical.copy()
    technical[hi:] = rng.normal(size=technical[hi:].shape)
    bars = {k: getattr(market.data, k).copy() for k in ("open", "close")}
    for a in bars.values():
        a[hi:] *= np.exp(rng.normal(0, 0.05, a[hi:].shape))
    other = replace(market, technical=technical, data=replace(market.data, **bars))
    assert bt.fit_cross_rule(other, EnvConfig()) == rule
    assert bt.fit_cross_rule(market, EnvConfig(), "val")["thresholds"] != rule["thresholds"]


def test_cross_rule_earns_the_lead_net_of_costs_and_loses_them_on_the_placebo(rule_markets):
    """On the test split (net of the environment's costs): the calibrated lead pays, the placebo's trades only cost.
    A market without a leader map is refused."""
    sharpe = {}
    for k, market in rule_markets.items():
        rule = bt.fit_cross_rule(market, EnvConfig())
        sharpe[k] = bt.run_backtest(bt.cross_rule_policy(rule), market, "test", EnvConfig(), 0)["agent"]["sharpe"]
    assert sharpe[0.45] > 3.0 and sharpe[0.0] < 0.0, sharpe
    with pytest.raises(ValueError, match="needs the lead-lag market"):
        bt.fit_cross_rule(md.make_synthetic_prepared(), EnvConfig())


def test_the_agents_final_backtest_reports_the_cross_rule_as_its_ceiling(rule_markets):
    """backtest.agent_backtests (every symbol agent's final report): on the lead-lag market it adds the cross rule,
    fitted on the train split, beside the own-window rule ceiling, with the same figures as the rule run by hand;
    on a market without a leader map it adds nothing."""

    def make_policy(sample_seed, record):
        pick = bt.random_policy(0 if sample_seed is None else sample_seed)

        def act(obs):
            if record is not None:  # (ret_1, P(increase), increase allowed) per symbol, as the agent records them
                record.append((obs["technical"][0, :, -1, 0], np.full(obs["technical"].shape[1], 0.5),
                               obs["action_mask"][0, :, BUY_SMALL] == 1))  # fmt: skip
            return pick(obs)

        return act

    market = rule_markets[0.45]
    tests = bt.agent_backtests(make_policy, market, "test", EnvConfig(), 0, samples=0)
    rule = bt.fit_cross_rule(market, EnvConfig(), "train")
    assert tests["cross_rule"] == rule
    by_hand = bt.run_backtest(bt.cross_rule_policy(rule), market, "test", EnvConfig(), 0)["agent"]
    assert tests["reports"]["cross_rule"] == by_hand and "rule_ceiling" in tests["reports"]
    assert "cross_rule" in tests["curves"] and "cross_rule" in tests["every_series"]
    plain = bt.agent_backtests(make_policy, md.make_synthetic_prepared(years=0.5), "test", EnvConfig(), 0, samples=0)
    assert plain["cross_rule"] is None and "cross_rule" not in plain["reports"]
