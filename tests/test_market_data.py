"""Market data: the synthetic generator, the user-data loaders and their validation, splits and the cache."""

import numpy as np

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
