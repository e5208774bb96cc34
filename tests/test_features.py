"""Technical and regime features: shapes, finiteness, and causality (cutting the data at t, replacing the future)."""

from dataclasses import replace

import numpy as np
import pytest

import market_data as md


def _cut(data: md.MarketData, stop: int) -> md.MarketData:
    arrays = {k: getattr(data, k)[:stop] for k in ("timestamps", "open", "high", "low", "close", "volume")}
    return replace(data, **arrays, tradable=data.tradable[:stop], benchmark=data.benchmark[:stop], regime_labels=None)


def _splice(data: md.MarketData, other: md.MarketData, t: int) -> md.MarketData:
    """data up to and including bar t, other's bars afterwards (rescaled so the prices stay plausible)."""
    out = {}
    for k in ("open", "high", "low", "close", "volume"):
        a, b = getattr(data, k).copy(), getattr(other, k)
        a[t + 1 :] = b[t + 1 :] * 1.7
        out[k] = a
    tradable = data.tradable.copy()
    tradable[t + 1 :] = other.tradable[t + 1 :]
    bench = data.benchmark.copy()
    bench[t + 1 :] = other.benchmark[t + 1 :] * 0.6
    return replace(data, **out, tradable=tradable, benchmark=bench)


@pytest.fixture(scope="module")
def market():
    return md.generate_synthetic_market(num_symbols=3, years=0.6, seed=7, gap_rate=0.02)


@pytest.mark.parametrize("mode", md.NORMALIZATIONS)
def test_technical_features_are_causal(market, mode):
    full = md.compute_technical(market, mode)
    T = len(market.timestamps)
    rng = np.random.default_rng(0)
    for t in sorted(rng.choice(np.arange(md.feature_warmup(), T - 1), size=5, replace=False)) + [T - 2]:
        cut = md.compute_technical(_cut(market, t + 1), mode)
        np.testing.assert_allclose(cut, full[: t + 1], rtol=0, atol=1e-6, err_msg=f"{mode} cut at {t}")
    other = md.generate_synthetic_market(num_symbols=3, years=0.6, seed=99, gap_rate=0.05)
    t = T // 2
    spliced = md.compute_technical(_splice(market, other, t), mode)
    np.testing.assert_array_equal(spliced[: t + 1], full[: t + 1])
    assert not np.array_equal(spliced[t + 1 :], full[t + 1 :]), "the splice should change the future"


def test_regime_features_are_causal(market):
    full = md.compute_regime(market)
    T = len(market.timestamps)
    for t in (md.feature_warmup(), T // 3, T // 2, T - 2):
        np.testing.assert_allclose(md.compute_regime(_cut(market, t + 1)), full[: t + 1], rtol=0, atol=1e-6)
    other = md.generate_synthetic_market(num_symbols=3, years=0.6, seed=99, gap_rate=0.05)
    t = T // 2
    spliced = md.compute_regime(_splice(market, other, t))
    np.testing.assert_array_equal(spliced[: t + 1], full[: t + 1])
    assert not np.array_equal(spliced[t + 1 :], full[t + 1 :])


@pytest.mark.parametrize("mode", md.NORMALIZATIONS)
def test_features_finite_float32_zero_on_warmup_and_missing_bars(market, mode):
    x = md.compute_technical(market, mode)
    g = md.compute_regime(market)
    assert x.shape == (len(market.timestamps), 3, len(md.FEATURE_NAMES)) == (x.shape[0], 3, 23)
    assert g.shape == (x.shape[0], len(md.REGIME_NAMES)) == (x.shape[0], 10)
    assert x.dtype == np.float32 and g.dtype == np.float32
    assert np.isfinite(x).all() and np.isfinite(g).all()
    w = md.feature_warmup()
    assert np.all(x[:w] == 0) and np.all(g[:w] == 0)
    assert (~market.tradable).any() and np.all(x[~market.tradable] == 0)
    # after the warm-up every feature varies on tradable bars (none is stuck at 0)
    live = x[w:][market.tradable[w:]]
    assert np.all(live.std(axis=0) > 0), [n for n, s in zip(md.FEATURE_NAMES, live.std(axis=0), strict=True) if s == 0]
    assert np.all(g[w:].std(axis=0) > 0)
    if mode == "minmax":
        assert x.min() >= -1 and x.max() <= 1


def test_known_feature_values_on_a_hand_built_series():
    """ret_1 and the raw range are what their formulas say, checked against a plain loop."""
    data = md.generate_synthetic_market(num_symbols=2, years=0.2, seed=3)
    raw = md.raw_technical(data)
    c, h, l = data.close, data.high, data.low
    for t in range(1, 20):
        for s in range(2):
            assert raw[t, s, 0] == pytest.approx(np.log(c[t, s] / c[t - 1, s]))
            assert raw[t, s, 4] == pytest.approx((h[t, s] - l[t, s]) / c[t, s])
    assert raw[40, 0, 3] == pytest.approx(np.log(c[40, 0] / c[5, 0]))


def test_unknown_normalization_is_a_clear_error(market):
    with pytest.raises(ValueError, match="normalization must be one of"):
        md.compute_technical(market, "softmax")
