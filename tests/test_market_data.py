"""Tests of market_data.py: the synthetic generator, the user-data loaders and their validation, splits, the cache,
the technical and regime features (shapes, finiteness, causality by cutting the data at t and by replacing the
future) and the supervised signals (AUC/F1 helpers, chance-level AUC on noise, a clear edge on a planted signal,
fitting on the train split only)."""

import shutil
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---------------------------------------------------------------------------------------------------------------
# User data: loaders, validation errors (one per case), bad-bar policies, real bars from the backtesting package.
# ---------------------------------------------------------------------------------------------------------------
N_BARS = 260  # warm-up 70 + lookback 24 + episode 100 = 194 needed


def _bars(n: int = N_BARS, seed: int = 0, start: str = "2024-01-02 14:30") -> pd.DataFrame:
    """Valid hourly bars on weekdays (7 a day), with mixed-case column names as exported by common tools."""
    rng = np.random.default_rng(seed)
    days = pd.bdate_range(start[:10], periods=n // 7 + 2)
    ts = (days.values[:, None] + pd.to_timedelta(np.arange(7) + 14.5, "h").values[None, :]).reshape(-1)[:n]
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.005, n)))
    open_ = np.r_[100.0, close[:-1]]
    return pd.DataFrame(
        {
            "Timestamp": ts,
            "Open": open_,
            "HIGH": np.maximum(open_, close) * 1.002,
            "low": np.minimum(open_, close) * 0.998,
            "Close": close,
            "Volume": rng.integers(1000, 5000, n).astype(float),
        }
    )


def _cfg(source, **kw) -> md.DataConfig:
    return md.DataConfig(**{"source": str(source), "sl_signals": False, "cache": False, **kw})


def _write(folder, name: str, df: pd.DataFrame):
    folder.mkdir(exist_ok=True)
    path = folder / name
    if name.endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("Close", np.nan, "NaN in open/high/low/close/volume"),
        ("HIGH", 50.0, "high below max(open, close)"),
        ("low", 500.0, "low above min(open, close)"),
        ("Open", -1.0, "non-positive price"),
        ("Volume", -5.0, "negative volume"),
    ],
)
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_bad_bar_raises_naming_file_row_and_problem(tmp_path, column, value, problem, suffix):
    df = _bars()
    df.loc[10, column] = value
    _write(tmp_path / "d", "ABC" + suffix, df)
    _write(tmp_path / "d", "XYZ" + suffix, _bars(seed=1))
    with pytest.raises(md.DataValidationError) as err:
        md.load_user_market(_cfg(tmp_path / "d"))
    msg = str(err.value)
    assert "ABC" + suffix in msg and "row 11" in msg and problem in msg and "bad-bars" in msg
    assert str(pd.Timestamp(df.loc[10, "Timestamp"])) in msg


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_prices_stored_as_text_are_named_as_not_numeric(tmp_path, suffix):
    df = _bars()
    df["Close"] = [f"${x:.2f}" for x in df["Close"]]  # currency-formatted strings, as some exports write them
    _write(tmp_path / "d", "TXT" + suffix, df)
    with pytest.raises(md.DataValidationError, match=r"TXT.* column 'Close' is not numeric \(row 1: '\$"):
        md.load_user_market(_cfg(tmp_path / "d"))


@pytest.mark.parametrize("content", ["timestamp,open,high,low,close,volume\n", "Some notes about the data.\n"])
def test_a_bar_file_must_be_csv_or_parquet(tmp_path, content):
    path = tmp_path / "SPY.txt"
    path.write_text(content)
    with pytest.raises(md.DataValidationError, match=r"SPY.txt: a .txt file; bar files are CSV \(.csv\) or parquet"):
        md.load_user_market(_cfg(path))


def test_duplicate_timestamp_raises(tmp_path):
    df = _bars()
    df.loc[20, "Timestamp"] = df.loc[19, "Timestamp"]
    _write(tmp_path / "d", "DUP.parquet", df)
    with pytest.raises(md.DataValidationError, match=r"DUP.parquet: row 21 .*duplicate timestamp"):
        md.load_user_market(_cfg(tmp_path / "d"))


def test_non_monotonic_timestamps_raise(tmp_path):
    df = _bars()
    df.loc[[30, 31], "Timestamp"] = df.loc[[31, 30], "Timestamp"].to_numpy()
    _write(tmp_path / "d", "ORD.csv", df)
    with pytest.raises(md.DataValidationError, match=r"ORD.csv: row 32 .*timestamps must increase"):
        md.load_user_market(_cfg(tmp_path / "d"))


def test_too_few_bars_raises(tmp_path):
    _write(tmp_path / "d", "SHORT.parquet", _bars(n=150))
    with pytest.raises(md.DataValidationError, match=r"SHORT.parquet: only 150 valid bars; at least 194"):
        md.load_user_market(_cfg(tmp_path / "d"))


def test_missing_folder_raises(tmp_path):
    with pytest.raises(md.DataValidationError, match="does not exist"):
        md.load_user_market(_cfg(tmp_path / "nowhere"))


def test_empty_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not data")
    with pytest.raises(md.DataValidationError, match="holds no .parquet or .csv files"):
        md.load_user_market(_cfg(tmp_path / "empty"))


def test_corrupt_file_raises(tmp_path):
    path = _write(tmp_path / "d", "BAD.parquet", _bars())
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(md.DataValidationError, match=r"Could not read .*BAD.parquet.*corrupt"):
        md.load_user_market(_cfg(tmp_path / "d"))


def test_missing_column_raises(tmp_path):
    _write(tmp_path / "d", "NOVOL.csv", _bars().drop(columns="Volume"))
    with pytest.raises(md.DataValidationError, match=r"NOVOL.csv: missing column 'volume'"):
        md.load_user_market(_cfg(tmp_path / "d"))


def test_unknown_benchmark_raises(tmp_path):
    _write(tmp_path / "d", "AAA.parquet", _bars())
    with pytest.raises(md.DataValidationError, match="Benchmark symbol 'SPY' is not in"):
        md.load_user_market(_cfg(tmp_path / "d", benchmark="SPY"))


def test_drop_policy_removes_bad_rows_and_counts_them(tmp_path):
    df = _bars(n=N_BARS + 10)
    df.loc[10, "Close"] = np.nan
    df.loc[40, "HIGH"] = 1.0
    df.loc[41, "Timestamp"] = df.loc[40, "Timestamp"]
    _write(tmp_path / "d", "DRP.parquet", df)
    with pytest.warns(UserWarning, match=r"DRP.parquet: bad_bars=drop: 1 x duplicate timestamp.*1 x NaN.*1 x high"):
        m = md.load_user_market(_cfg(tmp_path / "d", bad_bars="drop"))
    assert len(m.timestamps) == N_BARS + 10 - 3 and np.isfinite(m.close).all()


def test_repair_policy_fixes_high_low_and_counts(tmp_path):
    df = _bars()
    df.loc[50, "HIGH"] = df.loc[50, "Close"] * 0.9
    df.loc[60, "Volume"] = -3.0
    _write(tmp_path / "d", "REP.csv", df)
    with pytest.warns(UserWarning, match=r"REP.csv: bad_bars=repair: 1 x high raised.*1 x negative volume"):
        m = md.load_user_market(_cfg(tmp_path / "d", bad_bars="repair"))
    assert len(m.timestamps) == N_BARS
    assert m.high[50, 0] == max(m.open[50, 0], m.close[50, 0]) and m.volume[60, 0] == 0


def test_long_parquet_aliases_timezones_union_calendar_and_benchmark(tmp_path):
    a, b = _bars(seed=1), _bars(seed=2)
    b = b.drop(index=[100, 101]).reset_index(drop=True)  # two missing bars for symbol B
    a["ticker"], b["ticker"] = "AAA", "BBB"
    long = pd.concat([a, b]).rename(columns={"Timestamp": "Datetime"})
    # naive New York times: 09:30 local is 14:30 UTC in January
    long["Datetime"] = long["Datetime"] - pd.Timedelta(hours=5)
    path = tmp_path / "long.parquet"
    long.to_parquet(path, index=False)
    m = md.load_user_market(_cfg(path, timezone="America/New_York", benchmark="AAA"))
    assert m.symbols == ["AAA", "BBB"] and len(m.timestamps) == N_BARS
    assert pd.Timestamp(m.timestamps[0]) == pd.Timestamp("2024-01-02 14:30")
    assert not m.tradable[100:102, 1].any() and np.isnan(m.close[100:102, 1]).all() and m.tradable[:, 0].all()
    np.testing.assert_array_equal(m.benchmark, a["Close"].to_numpy())
    p = md.prepare_market(_cfg(path, timezone="America/New_York", benchmark="AAA"))
    # valuation_close is the only forward-filled array; fills use data.open/close, NaN on the missing bars
    assert p.valuation_close[100, 1] == p.data.close[99, 1] and np.isnan(p.data.open[100, 1])
    assert np.all(p.technical[100:102, 1] == 0)


def test_adj_close_ignored_unless_asked(tmp_path):
    df = _bars()
    df["Adj Close"] = df["Close"] * 0.5
    _write(tmp_path / "d", "ADJ.parquet", df)
    raw = md.load_user_market(_cfg(tmp_path / "d"))
    adj = md.load_user_market(_cfg(tmp_path / "d", adjusted=True))
    np.testing.assert_allclose(raw.close[:, 0], df["Close"])
    np.testing.assert_allclose(adj.close[:, 0], df["Close"] * 0.5)
    np.testing.assert_allclose(adj.high[:, 0], df["HIGH"] * 0.5)


@pytest.mark.parametrize(("name", "per_day", "per_year"), [("EURUSD", 24, (5500, 6500)), ("GOOG", 1, (245, 258))])
def test_real_bars_from_backtesting_package(tmp_path, name, per_day, per_year):
    import backtesting  # a dev requirement: a missing install fails here

    src = Path(backtesting.__file__).parent / "test" / f"{name}.csv"
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(src, folder / f"{name}.csv")
    p = md.prepare_market(_cfg(folder))
    assert p.data.symbols == [name] and p.data.bars_per_day == per_day
    assert per_year[0] < p.data.bars_per_year < per_year[1]
    assert np.isfinite(p.technical).all() and np.abs(p.technical[p.warmup :]).sum() > 0
    assert p.splits["test"][1] == len(p.data.timestamps)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_one_bar_file_is_one_symbol_named_by_the_file(tmp_path, suffix):
    path = _write(tmp_path, f"BTCUSD{suffix}", _bars())
    m = md.load_user_market(_cfg(path))
    assert m.symbols == ["BTCUSD"] and m.close.shape == (N_BARS, 1)
    assert m.benchmark_name == "EQUAL_WEIGHT"


def test_long_format_csv_with_finrls_tic_column(tmp_path):
    a, b = _bars(seed=1), _bars(seed=2)
    a["tic"], b["tic"] = "AAA", "BBB"
    path = _write(tmp_path, "long.csv", pd.concat([a, b]).rename(columns={"Timestamp": "date"}))
    m = md.load_user_market(_cfg(path))
    assert m.symbols == ["AAA", "BBB"]
    np.testing.assert_allclose(m.close[:, 1], b["Close"])


def test_a_long_files_error_names_the_row_in_the_file(tmp_path):
    a, b = _bars(seed=1), _bars(seed=2)
    a["symbol"], b["symbol"] = "AAA", "BBB"
    long = pd.concat([a, b]).reset_index(drop=True)
    long.loc[N_BARS + 10, "Close"] = np.nan  # BBB's 11th bar is the file's row N_BARS + 11
    path = _write(tmp_path, "long.csv", long)
    with pytest.raises(md.DataValidationError, match=rf"symbol BBB\): row {N_BARS + 11} "):
        md.load_user_market(_cfg(path))


def test_offsets_that_change_at_a_daylight_saving_switch_load(tmp_path):
    """New York intraday bars as vendors export them: ISO strings whose offset is -05:00 before the March switch and
    -04:00 after it. pandas 3 refuses to parse such a column without utc=True ("Mixed timezones detected")."""
    df = _bars(start="2024-03-04 14:30")
    local = pd.DatetimeIndex(df["Timestamp"]).tz_localize("UTC").tz_convert("America/New_York")
    df["Timestamp"] = [ts.isoformat() for ts in local]
    assert {s[-6:] for s in df["Timestamp"]} == {"-05:00", "-04:00"}
    m = md.load_user_market(_cfg(_write(tmp_path, "NYC.csv", df)))
    np.testing.assert_array_equal(m.timestamps, pd.DatetimeIndex(_bars(start="2024-03-04 14:30")["Timestamp"]).values)


def test_calendar_inference_does_not_assume_nanoseconds():
    ts = pd.date_range("2024-01-01", periods=24 * 60, freq="h")
    for unit in ("ns", "us", "ms", "s"):
        per_day, per_year = md.infer_calendar(ts.as_unit(unit).values)
        assert per_day == 24 and per_year == pytest.approx(24 * 365.25, rel=1e-3), unit


def test_zero_volume_bars_load_without_warnings(tmp_path):
    import warnings

    df = _bars()
    df.loc[50:60, "Volume"] = 0.0
    _write(tmp_path / "d", "ZERO.csv", df)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = md.prepare_market(_cfg(tmp_path / "d"))
    assert np.isfinite(p.technical).all() and np.isfinite(p.regime).all()


@pytest.mark.parametrize("missing", [40, 1])  # a delisting, or only the final bar missing: sold all the same
def test_a_symbol_that_ends_early_is_named_in_a_warning(tmp_path, missing):
    _write(tmp_path / "d", "LONG.csv", _bars(seed=1))
    _write(tmp_path / "d", "GONE.csv", _bars(seed=2).iloc[: N_BARS - missing])
    with pytest.warns(UserWarning, match=r"\['GONE'\] end before the sample does"):
        md.load_user_market(_cfg(tmp_path / "d"))


def test_equal_weight_benchmark_is_a_basket_bought_once_and_held():
    close = np.array(
        [
            [np.nan, np.nan, np.nan],
            [100.0, 50.0, np.nan],
            [110.0, 45.0, 10.0],
            [121.0, np.nan, 11.0],
            [np.nan, 54.0, 12.0],
        ]
    )
    index = md.equal_weight_index(close)
    # independently: $50 in each of A and B at bar 1 (C lists later and never enters), held; a bar without a price
    # keeps the symbol at its last close, so A's 121 stands at the end
    shares = {"A": 50.0 / 100.0, "B": 50.0 / 50.0}
    value = [
        100.0,
        100.0,
        shares["A"] * 110 + shares["B"] * 45,
        shares["A"] * 121 + shares["B"] * 45,
        shares["A"] * 121 + shares["B"] * 54,
    ]
    np.testing.assert_allclose(index, value)


def test_the_synthetic_calendar_agrees_with_its_annualisation():
    """About 252 sessions a year (weekdays less the exchange holidays), so that the calendar inferred from the
    timestamps matches the generator's bars_per_year = 7 x 252 within 1%."""
    data = md.generate_synthetic_market(num_symbols=1, years=4.0, seed=0)
    bars_per_day, bars_per_year = md.infer_calendar(data.timestamps)
    assert bars_per_day == 7 and abs(bars_per_year / data.bars_per_year - 1) < 0.01
    days = set(data.timestamps.astype("datetime64[D]").astype(str))
    assert not days & {"2022-01-17", "2022-04-15", "2022-07-04", "2023-12-25", "2024-11-28"}  # MLK, Good Friday, ...
    assert {"2022-01-18", "2022-04-14", "2023-12-26"} <= days


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------


def _assert_same(a: md.PreparedMarket, b: md.PreparedMarket):
    for k in ("technical", "regime", "sl_probs", "valuation_close"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    for k in ("open", "high", "low", "close", "volume", "tradable", "benchmark", "timestamps"):
        np.testing.assert_array_equal(getattr(a.data, k), getattr(b.data, k))
    assert a.splits == b.splits and a.data.symbols == b.data.symbols and a.warmup == b.warmup


def test_cache_round_trip_and_key(tmp_path):
    cfg = md.DataConfig(num_symbols=3, years=0.4, gap_rate=0.02, sl_signals=False, cache_dir=str(tmp_path))
    built = md.prepare_market(cfg)
    (folder,) = tmp_path.iterdir()
    assert folder.name == md.cache_key(cfg) and (folder / "technical.parquet").exists()
    stamp = (folder / "meta.json").stat().st_mtime_ns
    cached = md.prepare_market(cfg)
    assert (folder / "meta.json").stat().st_mtime_ns == stamp, "a valid cache must be read, not rewritten"
    _assert_same(built, cached)
    assert md.cache_key(replace(cfg, normalization="robust")) != md.cache_key(cfg)
    assert md.cache_key(replace(cfg, cache_dir="elsewhere")) == md.cache_key(cfg)


@pytest.mark.parametrize("victim", ["technical.parquet", "meta.json"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, victim):
    cfg = md.DataConfig(num_symbols=2, years=0.4, sl_signals=False, cache_dir=str(tmp_path))
    built = md.prepare_market(cfg)
    (folder,) = tmp_path.iterdir()
    path = folder / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip one byte
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="Rebuilding the market cache"):
        rebuilt = md.prepare_market(cfg)
    _assert_same(built, rebuilt)
    md.read_cache(folder, md.cache_key(cfg))  # the rewritten folder is valid again


def test_changed_user_file_changes_the_key(tmp_path):
    _write(tmp_path / "d", "AAA.parquet", _bars())
    cfg = _cfg(tmp_path / "d", cache=True, cache_dir=str(tmp_path / "cache"))
    key = md.cache_key(cfg)
    first = md.prepare_market(cfg)
    df = _bars()
    df.loc[200, "Close"] *= 1.01
    df.loc[200, "HIGH"] = max(df.loc[200, "HIGH"], df.loc[200, "Close"])
    _write(tmp_path / "d", "AAA.parquet", df)
    assert md.cache_key(cfg) != key, "edited data must not reuse the old cache"
    second = md.prepare_market(cfg)
    assert second.data.close[200, 0] == pytest.approx(first.data.close[200, 0] * 1.01)


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------
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
    with pytest.raises(md.UserInputError, match="--data.normalization 'softmax': use one of"):
        md.compute_technical(market, "softmax")


# ---------------------------------------------------------------------------------------------------------------
# Supervised signals
# ---------------------------------------------------------------------------------------------------------------
SMALL = dict(num_symbols=4, years=1.0, sl_epochs=3, sl_max_samples=4000)


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding creates many ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert md.roc_auc(y, s) == pytest.approx(pairwise, abs=1e-12)
    assert md.roc_auc(y, y.astype(float)) == 1.0 and md.roc_auc(y, -y.astype(float)) == 0.0
    assert np.isnan(md.roc_auc(np.ones(5), np.arange(5.0)))


def test_f1_score_by_hand():
    y = np.array([1, 1, 0, 0, 1])
    p = np.array([0.9, 0.2, 0.7, 0.1, 0.6])  # tp 2, fp 1, fn 1
    assert md.f1_score(y, p) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_forward_labels_use_the_horizon_and_mark_the_end_invalid():
    close = np.array([[1.0], [2.0], [1.5], [np.nan], [3.0]])
    y, valid = md.forward_labels(close, horizon=2, threshold=0.0)
    assert y[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert valid[:, 0].tolist() == [True, False, True, False, False]


def _prepared(signal_strength: float) -> md.PreparedMarket:
    return md.make_synthetic_prepared(seed=3, signal_strength=signal_strength, sl_signals=True, **SMALL)


def test_pure_noise_gives_chance_auc():
    p = _prepared(0.0)
    for name in md.SL_MODELS:
        assert 0.45 <= p.sl_metrics[name]["val_auc"] <= 0.55, p.sl_metrics
        assert p.sl_metrics[name]["val_samples"] > 500


def test_planted_signal_gives_clear_edge():
    p = _prepared(0.5)
    for name in md.SL_MODELS:
        assert p.sl_metrics[name]["val_auc"] > 0.6, p.sl_metrics
        assert 0.0 < p.sl_metrics[name]["val_f1"] <= 1.0
    assert p.sl_probs.shape == (*p.data.close.shape, 3) and p.sl_probs.dtype == np.float32
    assert p.sl_probs.min() >= 0 and p.sl_probs.max() <= 1
    assert np.all(p.sl_probs[: p.warmup] == 0.5)
    assert p.sl_probs[p.splits["test"][0] :].std() > 0.01


def test_classifiers_see_only_the_train_split():
    cfg = md.DataConfig(seed=3, signal_strength=0.3, sl_signals=True, cache=False, **SMALL)
    data = md.load_market(cfg)
    base = md.build_prepared(data, cfg)
    stop = base.splits["train"][1]
    other = md.generate_synthetic_market(4, 1.0, seed=11, signal_strength=0.0)
    swapped = {
        k: np.vstack([getattr(data, k)[:stop], getattr(other, k)[stop:] * 2.0])
        for k in ("open", "high", "low", "close")
    }
    changed = md.build_prepared(replace(data, **swapped), cfg)
    np.testing.assert_array_equal(changed.sl_probs[:stop], base.sl_probs[:stop])
    assert not np.array_equal(changed.sl_probs[stop:], base.sl_probs[stop:])
    for name in md.SL_MODELS:
        assert changed.sl_metrics[name]["train_auc"] == base.sl_metrics[name]["train_auc"]


def test_regime_foresight_disperses_the_cross_section_before_a_downturn():
    """With foresight the bull days before a bear or crisis regime have (1 + 2 x foresight) times the sector and
    idiosyncratic volatility; the market factor, and so the benchmark, is untouched; at 0 nothing changes."""
    base = md.generate_synthetic_market(12, 10.0, seed=1)
    seen = md.generate_synthetic_market(12, 10.0, seed=1, regime_foresight=0.5)
    np.testing.assert_array_equal(base.regime_labels, seen.regime_labels)
    np.testing.assert_allclose(base.benchmark, seen.benchmark)
    np.testing.assert_array_equal(
        md.generate_synthetic_market(12, 10.0, seed=1, regime_foresight=0.0).close, base.close
    )
    warn = np.repeat(md.downturn_warning(base.regime_labels[::7]), 7)[1:]
    assert 0.01 < warn.mean() < 0.1
    calm = ~warn & (base.regime_labels[1:] == 0)

    def dispersion(d):
        return np.diff(np.log(d.close), axis=0).std(1)

    ratio = dispersion(seen)[warn].mean() / dispersion(seen)[calm].mean()
    assert 1.8 < ratio < 2.2 and 0.9 < dispersion(base)[warn].mean() / dispersion(base)[calm].mean() < 1.1
    with pytest.raises(md.UserInputError, match="regime-foresight"):
        md.generate_synthetic_market(3, 0.5, regime_foresight=1.5)


def test_downturn_warning_marks_the_bull_days_before_each_onset():
    days = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 2, 0])
    want = np.array([0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    np.testing.assert_array_equal(md.downturn_warning(days, days=5), want)


@settings(max_examples=200, deadline=None)
@given(
    T=st.integers(3000, 30000),
    warmup=st.integers(30, 200),
    train_frac=st.floats(0.4, 0.8),
    val_frac=st.floats(0.05, 0.15),
    embargo=st.integers(1, 60),
    folds=st.integers(1, 6),
    window=st.sampled_from(["expanding", "rolling"]),
)
def test_walk_forward_folds_never_train_or_select_on_a_graded_bar(
    T, warmup, train_frac, val_frac, embargo, folds, window
):
    """Every fold's train and validation bars end at least `embargo` bars before its test block; the test blocks
    tile the out-of-sample region in order, so every bar there is graded by exactly one fold; a rolling window keeps
    the first fold's train length."""
    splits = [md.make_fold_splits(T, warmup, train_frac, val_frac, embargo, k, folds, window) for k in range(folds)]
    assert splits[0]["test"][0] == warmup + int((T - warmup) * train_frac) and splits[-1]["test"][1] == T
    for k, s in enumerate(splits):
        (tr_lo, tr_hi), (va_lo, va_hi), (te_lo, te_hi) = s["train"], s["val"], s["test"]
        assert warmup <= tr_lo < tr_hi and tr_hi + embargo <= va_lo < va_hi and va_hi + embargo <= te_lo < te_hi
        if k:
            assert te_lo == splits[k - 1]["test"][1]  # contiguous blocks: no bar graded twice, none skipped
        if window == "rolling" and tr_lo > warmup:
            assert tr_hi - tr_lo == splits[0]["train"][1] - splits[0]["train"][0]
    graded = np.concatenate([np.arange(*s["test"]) for s in splits])
    assert len(np.unique(graded)) == len(graded)


# ---------------------------------------------------------------------------------------------------------------
# Edge regime (--data.edge-regime): a hidden momentum / reversal state, its announcement, the placebos, and the
# cross-sectional features that read it. One 4-symbol, 4-year market per mode (~0.06 s each).
# ---------------------------------------------------------------------------------------------------------------
EDGE = dict(num_symbols=4, years=4.0, seed=1)


@pytest.fixture(scope="module")
def edge_markets():
    return {mode: md.generate_synthetic_market(**EDGE, edge_regime=mode) for mode in md.EDGE_REGIMES}


def _announced(data: md.MarketData) -> np.ndarray:
    """(T,) bool bars of the announcement that follows data.edge_labels (flip and placebo-b)."""
    return np.repeat(md.edge_announcement(data.edge_labels[::7]), 7)


def _standardised(data: md.MarketData) -> np.ndarray:
    """(T-1, S) returns over a causal 70-bar std (the std of the bars before), NaN where undefined."""
    r = np.diff(np.log(data.close), axis=0)
    return r / pd.DataFrame(r).rolling(70, min_periods=35).std().shift(1).to_numpy()


def _pooled_ac1(data: md.MarketData, label: int) -> float:
    """sum z[t] z[t-1] / sum z[t-1]^2 over all symbols and the bars t whose edge label is `label`."""
    z = np.nan_to_num(_standardised(data))
    on = data.edge_labels[2:] == label  # the label of the later bar of each pair
    return (z[1:] * z[:-1])[on].sum() / (z[:-1] ** 2)[on].sum()


def _avg_corr(data: md.MarketData, bars: np.ndarray) -> float:
    """Average pairwise correlation of the standardised returns on the return bars selected by bars (T,)."""
    z = _standardised(data)
    z = z[bars[1:] & np.isfinite(z).all(1)]
    c = np.corrcoef(z.T)
    return c[~np.eye(len(c), dtype=bool)].mean()


def test_edge_regime_off_is_todays_market():
    """With "off" nothing is drawn from the market's generator: the arrays equal a call without the argument (which
    the other generator tests pin down); the modes share one chain, the regimes and the benchmark."""
    kw = dict(num_symbols=5, years=0.5, seed=3, gap_rate=0.02, regime_foresight=0.5)
    base, off = md.generate_synthetic_market(**kw), md.generate_synthetic_market(**kw, edge_regime="off")
    for name in ("timestamps", "open", "high", "low", "close", "volume", "tradable", "benchmark", "regime_labels"):
        np.testing.assert_array_equal(getattr(off, name), getattr(base, name))
    assert base.edge_labels is None and off.edge_labels is None
    flip = md.generate_synthetic_market(**kw, edge_regime="flip")
    assert not np.array_equal(flip.close, base.close, equal_nan=True)
    np.testing.assert_array_equal(flip.benchmark, base.benchmark)  # the market factor is never touched
    np.testing.assert_array_equal(flip.regime_labels, base.regime_labels)
    for mode in ("placebo-a", "placebo-b"):
        same_chain = md.generate_synthetic_market(**kw, edge_regime=mode).edge_labels
        np.testing.assert_array_equal(same_chain, flip.edge_labels)


def test_edge_labels_are_a_daily_chain_with_r_on_a_fifth_of_the_days():
    data = md.generate_synthetic_market(num_symbols=1, years=10.0, seed=0, edge_regime="flip")
    labels = data.edge_labels
    assert labels.dtype == np.int8 and labels.shape == data.timestamps.shape and set(np.unique(labels)) == {0, 1}
    days = labels.reshape(-1, 7)
    assert np.all(days == days[:, :1]), "the state changes only between days"
    day = days[:, 0]
    assert day[0] == 0 and 0.12 < day.mean() < 0.3
    onsets = np.sum((day[1:] == 1) & (day[:-1] == 0))
    assert 5 < day.sum() / onsets < 17, "R spells last ~10 days"


def test_edge_announcement_marks_r_days_and_the_days_before_each_onset():
    days = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0])
    want = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    np.testing.assert_array_equal(md.edge_announcement(days, days=3), want)


def test_flip_reverses_the_planted_autocorrelation_on_r_days(edge_markets):
    """rho_t = +rho on M days and -rho on R days (flip and placebo-a); placebo-b keeps +rho everywhere."""
    for mode in ("flip", "placebo-a"):
        m, r = _pooled_ac1(edge_markets[mode], 0), _pooled_ac1(edge_markets[mode], 1)
        assert m > 0.2 and r < -0.2, (mode, m, r)
    m, r = _pooled_ac1(edge_markets["placebo-b"], 0), _pooled_ac1(edge_markets["placebo-b"], 1)
    assert m > 0.2 and r > 0.2, (m, r)


def test_the_announcement_moves_symbols_together_but_not_the_benchmark(edge_markets):
    """On announced bars sector and idiosyncratic volatility halve: the average correlation rises (flip and
    placebo-b, whose announcement follows the chain); the benchmark is the off market's, bar for bar."""
    for mode in ("flip", "placebo-b"):
        data = edge_markets[mode]
        ann = _announced(data)
        on, elsewhere = _avg_corr(data, ann), _avg_corr(data, ~ann)
        assert on > 0.4 and elsewhere < 0.35 and on - elsewhere > 0.15, (mode, on, elsewhere)
        np.testing.assert_array_equal(data.benchmark, edge_markets["off"].benchmark)
    # the benchmark's bar returns are as large on announced bars as elsewhere (bull bars; median |return|, which
    # the market factor's volatility clustering disturbs less than the std)
    data = md.generate_synthetic_market(num_symbols=1, years=10.0, seed=1, edge_regime="flip")
    ann, bull = _announced(data)[1:], data.regime_labels[1:] == 0
    rb = np.abs(np.diff(np.log(data.benchmark)))
    assert 0.85 < np.median(rb[ann & bull]) / np.median(rb[~ann & bull]) < 1.15


def test_placebo_a_announces_nothing(edge_markets):
    """placebo-a's announcement follows an independent copy of the chain: on R days the symbols are no more
    correlated than elsewhere, although the flips are there (test above)."""
    data = edge_markets["placebo-a"]
    r_days = data.edge_labels == 1
    assert abs(_avg_corr(data, r_days) - _avg_corr(data, ~r_days)) < 0.1
    assert _avg_corr(edge_markets["flip"], r_days) - _avg_corr(edge_markets["flip"], ~r_days) > 0.15


def test_edge_labels_are_hidden_from_the_observation():
    """The label lives in MarketData only: no PreparedMarket array is named for it, and changing it changes no
    feature (technical, regime, sl_probs, cross-section): they are functions of the bars alone."""
    cfg = md.DataConfig(num_symbols=3, years=0.5, seed=2, edge_regime="flip", sl_signals=False, cache=False)
    data = md.load_market(cfg)
    assert data.edge_labels is not None and data.edge_labels.any()
    base = md.build_prepared(data, cfg)
    assert not [f.name for f in fields(md.PreparedMarket) if "edge" in f.name]
    other = replace(data, edge_labels=(1 - data.edge_labels).astype(np.int8), regime_labels=None)
    changed = md.build_prepared(other, cfg)
    for name in ("technical", "regime", "sl_probs", "valuation_close"):
        np.testing.assert_array_equal(getattr(changed, name), getattr(base, name))
    np.testing.assert_array_equal(md.cross_section_features(other), md.cross_section_features(data))


def test_cache_round_trip_keeps_edge_labels(tmp_path):
    cfg = md.DataConfig(num_symbols=3, years=0.4, edge_regime="placebo-b", sl_signals=False, cache_dir=str(tmp_path))
    built = md.prepare_market(cfg)
    cached = md.prepare_market(cfg)
    _assert_same(built, cached)
    assert cached.data.edge_labels.dtype == np.int8
    np.testing.assert_array_equal(cached.data.edge_labels, built.data.edge_labels)
    np.testing.assert_array_equal(cached.data.regime_labels, built.data.regime_labels)
    off = replace(cfg, edge_regime="off")
    assert md.cache_key(off) != md.cache_key(cfg) and md.prepare_market(off).data.edge_labels is None


def test_a_bad_edge_regime_is_named():
    with pytest.raises(md.UserInputError, match=r"--data.edge-regime 'flop': use one of"):
        md.check_synthetic_flags(0.3, 0.0, 0.0, "flop")
    with pytest.raises(md.UserInputError, match=r"--data.edge-regime"):
        md.check_data_config(md.DataConfig(edge_regime="sometimes"))
    with pytest.raises(md.UserInputError, match=r"--data.edge-regime"):
        md.generate_synthetic_market(3, 0.5, edge_regime="on")
    md.check_synthetic_flags(0.3, 0.0, 0.0)  # the three-argument call sites keep working


# cross_section_features ----------------------------------------------------------------------------------------
def _cross_section_loop(data: md.MarketData) -> np.ndarray:
    """cross_section_features written as plain loops over bars, symbols and pairs."""
    T, S = data.close.shape
    c = pd.DataFrame(data.close).ffill().to_numpy()
    r = np.full((T, S), np.nan)
    r[1:] = np.log(c[1:] / c[:-1])
    r[~np.isfinite(data.close)] = np.nan
    z = np.full((T, S), np.nan)
    for t in range(T):
        for s in range(S):
            past = r[max(t - 70, 0) : t, s]
            past = past[np.isfinite(past)]
            if len(past) >= 35 and past.std(ddof=1) > 0:
                z[t, s] = r[t, s] / past.std(ddof=1)
    xs = np.array([np.nanstd(row) if np.isfinite(row).sum() >= 2 else np.nan for row in r])
    out = np.zeros((T, 3))
    for t in range(md.feature_warmup(), T):
        win = np.nan_to_num(z[t - 13 : t + 1])
        q = (win**2).sum(0)
        num = sum((win[:, i] * win[:, j]).sum() for i in range(S) for j in range(S) if i != j)
        den = sum(np.sqrt(q[i] * q[j]) for i in range(S) for j in range(S) if i != j)
        out[t, 0] = num / den if den > 0 else 0.0
        fast, slow = xs[t - 6 : t + 1], xs[max(t - 139, 0) : t + 1]
        if np.isfinite(fast).sum() >= 4 and np.isfinite(slow).sum() >= 70:
            out[t, 1] = np.nanmean(fast) / np.nanmean(slow)
        num = den = 0.0
        for u in range(t - 6, t + 1):
            for s in range(S):
                if np.isfinite(z[u, s]) and np.isfinite(z[u - 1, s]):
                    num, den = num + z[u, s] * z[u - 1, s], den + z[u - 1, s] ** 2
        out[t, 2] = num / den if den > 0 else 0.0
    return out


def test_cross_section_features_match_a_plain_loop():
    data = md.generate_synthetic_market(num_symbols=3, years=0.3, seed=4, gap_rate=0.03, edge_regime="flip")
    assert (~data.tradable).any()
    np.testing.assert_allclose(md.cross_section_features(data), _cross_section_loop(data), rtol=1e-5, atol=1e-5)


def test_cross_section_features_are_causal_finite_and_scale_free(market):
    full = md.cross_section_features(market)
    T = len(market.timestamps)
    assert full.shape == (T, len(md.CROSS_SECTION_NAMES)) == (T, 3) and full.dtype == np.float32
    assert np.isfinite(full).all() and np.all(full[: md.feature_warmup()] == 0)
    assert np.all(full[md.feature_warmup() :].std(0) > 0)
    for t in (md.feature_warmup(), T // 3, T - 2):
        np.testing.assert_allclose(md.cross_section_features(_cut(market, t + 1)), full[: t + 1], rtol=0, atol=1e-6)
    other = md.generate_synthetic_market(num_symbols=3, years=0.6, seed=99, gap_rate=0.05)
    t = T // 2
    spliced = md.cross_section_features(_splice(market, other, t))
    np.testing.assert_array_equal(spliced[: t + 1], full[: t + 1])
    assert not np.array_equal(spliced[t + 1 :], full[t + 1 :]), "the splice should change the future"
    doubled = replace(market, close=market.close**2)  # every log return x2: the features do not change
    np.testing.assert_allclose(md.cross_section_features(doubled), full, rtol=1e-4, atol=1e-5)


def test_cross_section_features_read_the_edge_regime(edge_markets):
    """xs_autocorr_1d follows the flip (M > 0 > R); avg_corr_2d and dispersion_1d follow the announcement."""
    w = md.feature_warmup()
    for mode in ("flip", "placebo-b"):
        data = edge_markets[mode]
        f, r_bars, ann = md.cross_section_features(data)[w:], data.edge_labels[w:] == 1, _announced(data)[w:]
        assert f[~r_bars, 2].mean() > 0.15
        assert (f[r_bars, 2].mean() < -0.15) if mode == "flip" else (f[r_bars, 2].mean() > 0.15)
        assert f[ann, 0].mean() > f[~ann, 0].mean() + 0.15
        assert f[ann, 1].mean() < 0.85 * f[~ann, 1].mean()
