"""Market data: the synthetic generator, the user-data loaders and their validation, splits and the cache."""

import numpy as np
import pandas as pd
import pytest

import market_data as md


def test_make_synthetic_prepared_contract():
    p = md.make_synthetic_prepared(num_symbols=3, years=0.25, seed=1)
    T, S = p.data.close.shape
    assert S == 3 and T == 63 * 7
    assert p.technical.shape == (T, S, 23) and p.technical.dtype == np.float32
    assert p.regime.shape == (T, 10) and p.regime.dtype == np.float32
    assert p.sl_probs.shape == (T, S, 3) and np.all(p.sl_probs == 0.5)
    assert np.isfinite(p.technical).all() and np.isfinite(p.regime).all()
    assert np.isfinite(p.valuation_close).all() and np.isfinite(p.data.benchmark).all()
    assert len(p.feature_names) == 23 and len(p.regime_names) == 10
    (a0, a1), (b0, b1), (c0, c1) = p.splits["train"], p.splits["val"], p.splits["test"]
    assert p.warmup <= a0 < a1 and a1 + p.embargo <= b0 < b1 and b1 + p.embargo <= c0 < c1 == T
    assert p.embargo >= p.lookback
    assert all(not s.startswith(("AAPL", "SPY")) for s in p.data.symbols)


def test_same_seed_same_arrays_other_seed_differs():
    a = md.generate_synthetic_market(5, 0.5, seed=3, gap_rate=0.02)
    b = md.generate_synthetic_market(5, 0.5, seed=3, gap_rate=0.02)
    c = md.generate_synthetic_market(5, 0.5, seed=4, gap_rate=0.02)
    for name in ("open", "high", "low", "close", "volume", "tradable", "benchmark"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.allclose(np.nan_to_num(a.close), np.nan_to_num(c.close))


# ---------------------------------------------------------------------------------------------------------------
# Stylised facts of the synthetic market on the 143-symbol, 2-year sample (one shared sample).
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def big_market():
    return md.generate_synthetic_market(num_symbols=143, years=2.0, seed=0)


@pytest.fixture(scope="session")
def big_returns(big_market):
    return np.diff(np.log(big_market.close), axis=0)  # (T-1, S)


def test_big_market_shape_and_calendar(big_market):
    T, S = big_market.close.shape
    assert S == 143 and T == 504 * 7
    ts = pd.DatetimeIndex(big_market.timestamps)
    assert set(ts.day_of_week) <= {0, 1, 2, 3, 4}, "weekends must be skipped"
    assert (pd.Series(ts.normalize()).value_counts() == 7).all()
    assert big_market.bars_per_day == 7 and big_market.bars_per_year == 7 * 252


def test_fat_tails(big_returns):
    z = (big_returns - big_returns.mean(0)) / big_returns.std(0)
    excess_kurtosis = (z**4).mean(0) - 3.0
    assert np.median(excess_kurtosis) > 3.0


def test_volatility_clustering(big_returns):
    a = np.abs(big_returns) - np.abs(big_returns).mean(0)
    acf = [(a[k:] * a[:-k]).mean() / (a * a).mean() for k in range(1, 25)]
    assert min(acf) > 0.0, acf


def test_correlation_with_market(big_market, big_returns):
    bench = np.diff(np.log(big_market.benchmark))
    corr = [np.corrcoef(big_returns[:, s], bench)[0, 1] for s in range(big_returns.shape[1])]
    assert 0.2 < np.mean(corr) < 0.7


def test_ohlc_consistent_and_volume_positive(big_market):
    d = big_market
    assert np.all(d.high >= np.maximum(d.open, d.close)) and np.all(d.low <= np.minimum(d.open, d.close))
    assert np.all(d.low > 0) and np.all(d.volume > 0)
    assert np.isfinite(d.benchmark).all() and d.tradable.all()


def test_crisis_regime_is_more_volatile(big_market, big_returns):
    regime = big_market.regime_labels[1:]
    assert (regime == 2).sum() > 50, "the sample should visit the crisis regime"
    bull, crisis = big_returns[regime == 0].std(), big_returns[regime == 2].std()
    assert crisis > 1.5 * bull


def test_gaps_are_nan_and_not_tradable():
    d = md.generate_synthetic_market(6, 0.5, seed=2, gap_rate=0.05)
    missing = ~d.tradable
    assert 0.02 < missing.mean() < 0.08
    for a in (d.open, d.high, d.low, d.close, d.volume):
        assert np.isnan(a[missing]).all() and np.isfinite(a[~missing]).all()


def test_planted_signal_strength_sets_lag1_autocorrelation():
    """rho = signal_strength is the lag-1 autocorrelation of standardised returns; rho = 0 leaves none."""
    for rho in (0.0, 0.3):
        d = md.generate_synthetic_market(40, 1.0, seed=5, signal_strength=rho)
        r = np.diff(np.log(d.close), axis=0)
        z = r / pd.DataFrame(r).rolling(35, min_periods=10).std().shift(1).to_numpy()
        z = np.where(np.isfinite(z), z, 0.0)
        ac1 = np.mean([np.corrcoef(z[1:, s], z[:-1, s])[0, 1] for s in range(40)])
        assert abs(ac1 - rho) < 0.06, (rho, ac1)
