"""Market data for the trading environment: bars (a seeded synthetic market or the user's own files), validation,
calendar alignment, causal features, supervised signals, chronological splits and the prepared-array cache.

Reading order: DataConfig -> containers -> synthetic market -> user-data loaders and validation -> features
(technical, regime) -> splits -> supervised signals -> cache -> prepare_market / make_synthetic_prepared.
Every feature at bar t uses bars <= t only; tests/test_market_data.py checks that by cutting and by replacing the
future.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

# Bumped by hand when the meaning of a cached array changes; the cache key also hashes this file's source.
CODE_VERSION = "3"


class UserInputError(ValueError):
    """Bad input that the user can fix (a file, a flag, a combination of flags): the message names the input and
    the fix. The scripts print it as one line and exit with status 2, without a traceback."""


@dataclass
class DataConfig:
    """Where the bars come from and how they are turned into observations (nested as `data` in every script)."""

    source: str = "synthetic"
    """"synthetic"; one bar file (.csv or .parquet; the file name is the symbol); a folder of per-symbol bar
files (.csv or .parquet; other files there are ignored); or one long-format bar file with a symbol column"""
    num_symbols: int = 10
    """Synthetic only: number of symbols in the universe."""
    years: float = 10.0
    """Synthetic only: length of the sample in years of 252 trading days (10: a test split of ~2,600 bars, where a
Sharpe ratio's standard error is ~1.2)"""
    seed: int = 0
    """Synthetic only: seed of the market generator (independent of the training seed)."""
    signal_strength: float = 0.3
    """Synthetic only: lag-1 autocorrelation rho of standardised returns, which explains rho^2 of the next bar's
variance. 0.3 leaves an edge that a one-line rule on ret_1 captures net of costs; 0.1 does not (its gross edge
per bar held is below the round-trip cost); 0 is pure noise (the placebo)"""
    gap_rate: float = 0.0
    """Synthetic only: fraction of bars lost to halts (NaN bars, not tradable)."""
    regime_foresight: float = 0.0
    """Synthetic only: how visible a downturn is before it starts, in [0, 1]. On the 5 bull days before a bear or crisis
regime begins, the sector and idiosyncratic volatility rise by (1 + 2 x foresight) while the market factor does not:
the cross-section disperses (the `dispersion` regime feature) before the benchmark falls. 0: no warning (the
master's placebo); the regime label itself is never observed"""
    edge_regime: Literal["off", "flip", "placebo-a", "placebo-b"] = "off"
    """Synthetic only: a hidden daily edge state to time, momentum M or reversal R (a Markov chain, R ~20% of days in
spells of ~10). flip: the planted autocorrelation is +signal_strength on M days and -signal_strength on R days,
and R is announced (from 3 days before it begins to its end) by sector and idiosyncratic volatility x0.5 under an
unchanged market factor, so symbols move together (average correlation ~0.3 -> ~0.5) while the benchmark does
not change. placebo-a: the flips without the announcement (it follows an independent copy of the chain);
placebo-b: the announcement without the flips; off (default): today's market, byte for byte. The state is
MarketData.edge_labels, never observed"""
    lead_lag: float | None = None
    """Synthetic only: kappa of a market where only cross-symbol information pays. Symbols form K = ceil(S / 5)
sectors, symbol s in sector s mod K, each led by its first symbol; a follower's next standardised return loads kappa
on its leader's last idiosyncratic shock, and no symbol's own window holds an edge (needs --data.signal-strength 0).
A one-line cross rule (backtest.fit_cross_rule) earns it; kappa 0.45 clears costs by about the 0.3 market's margin,
see docs/data.md. Kappa 0 is the placebo: the same sectors and marginals without the lead. None (default): off,
today's market byte for byte. The map is MarketData.leader_map, never observed"""
    symbols: list[str] | None = None
    """User data: keep only these symbols (default: every file / every symbol in the long parquet)."""
    benchmark: str | None = None
    """User data: symbol whose close is the benchmark (e.g. SPY); default: equal-weight index of the universe."""
    adjusted: bool = False
    """User data: use the Adj Close column (OHL scaled by the same factor) instead of Close."""
    timezone: str = "UTC"
    """User data: time zone of naive timestamps; aware timestamps are converted to UTC either way."""
    bad_bars: Literal["raise", "drop", "repair"] = "raise"
    """User data: what to do with invalid bars: "raise" (default), "drop" them, or "repair" what can be repaired."""
    normalization: Literal["zscore", "robust", "minmax"] = "zscore"
    """Technical feature normalisation: "zscore", "robust" (median/IQR) or "minmax", all rolling and causal."""
    norm_window: int = 140
    """Bars in the rolling normalisation window (140 = 20 trading days of hourly bars)."""
    feature_clip: float = 10.0
    """Normalised technical features are clipped to [-clip, clip] (documented; minmax lies in [-1, 1] anyway)."""
    lookback: int = 24
    """Bars in one observation window (technical[t - lookback + 1 : t + 1])."""
    min_episode_bars: int = 100
    """Each symbol file must hold at least warm-up + lookback + this many bars."""
    train_frac: float = 0.7
    """Fraction of the post-warm-up bars in the train split."""
    val_frac: float = 0.15
    """Fraction in the validation split (the test split gets the rest)."""
    embargo: int | None = None
    """Bars left out between splits; default and minimum: max(lookback, sl_horizon)."""
    folds: int = 0
    """Walk-forward folds (the scripts' --walk-forward sets it): the last 1 - train_frac of the bars are cut into this
many consecutive test blocks, each fold with its own earlier train and validation splits; 0: one train/val/test
split"""
    fold: int = 0
    """Which walk-forward fold's splits to use (0 .. folds - 1)"""
    fold_window: Literal["expanding", "rolling"] = "expanding"
    """Walk-forward train window: expanding (from the warm-up on) or rolling (the first fold's length, moving)"""
    sl_signals: bool = True
    """Fit the MLP/LSTM/GRU signal classifiers on the train split (else sl_probs = 0.5)."""
    sl_horizon: int = 1
    """Label horizon in bars: the label at t is log(close[t + h] / close[t]) > sl_threshold."""
    sl_threshold: float = 0.0
    """Label threshold on the forward log return."""
    sl_epochs: int = 4
    """Training epochs of each signal classifier."""
    sl_max_samples: int = 20000
    """Training windows subsampled (seeded) for each fit, to bound fitting time for large universes."""
    sl_folds: int = 4
    """Folds of the purged k-fold that gives the train split out-of-fold probabilities (k + 1 fits per classifier)."""
    sl_threads: int = 1
    """torch threads while fitting and predicting the classifiers (1: more threads stall on a busy shared CPU)."""
    cache: bool = True
    """Read and write the prepared arrays under cache_dir."""
    cache_dir: str = ".cache/market"
    """Folder of the parquet cache, one sub-folder per hash of data, parameters and code version."""


@dataclass
class MarketData:
    """Raw bars aligned to one calendar: T bars x S symbols."""

    timestamps: np.ndarray
    """(T,) datetime64[ns], UTC."""
    symbols: list[str]
    """(S,) symbol names."""
    open: np.ndarray
    """(T, S) float64; NaN where the bar is missing."""
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    tradable: np.ndarray
    """(T, S) bool; False on missing bars and halts (the environment allows only HOLD there)."""
    benchmark: np.ndarray
    """(T,) float64 benchmark close, finite everywhere."""
    benchmark_name: str
    bars_per_day: float
    bars_per_year: float
    """From the data's own calendar (hourly US equities: 7 * 252)."""
    regime_labels: np.ndarray | None = None
    """Synthetic only: (T,) int8 hidden regime, 0 bull, 1 bear, 2 crisis (never part of the observation)."""
    edge_labels: np.ndarray | None = None
    """Synthetic with --data.edge-regime other than off: (T,) int8 hidden daily edge state, 0 momentum (M), 1 reversal
    (R), the chain that drives the flips (placebo-b: the announcement). Never part of the observation; None when off
    and for user data."""
    leader_map: np.ndarray | None = None
    """Synthetic with --data.lead-lag: (S,) int64, the index of each symbol's sector leader (a leader maps to itself;
    the followers are the symbols s with leader_map[s] != s). Never part of the observation; None when lead-lag is
    off and for user data."""
    source: str = "synthetic"
    """Where the bars came from (for reports)."""


@dataclass
class PreparedMarket:
    """Bars plus everything the environment observes, computed once and cached."""

    data: MarketData
    technical: np.ndarray
    """(T, S, 23) float32, finite everywhere (zeros before the warm-up)."""
    regime: np.ndarray
    """(T, 10) float32, finite everywhere."""
    sl_probs: np.ndarray
    """(T, S, 3) float32 in [0, 1]: MLP, LSTM, GRU up-move probabilities."""
    valuation_close: np.ndarray
    """(T, S) float64 close, forward-filled (back-filled before a listing) to mark positions; never used for fills."""
    splits: dict[str, tuple[int, int]]
    """"train" | "val" | "test" -> [start, stop) bar indices, separated by an embargo >= the lookback."""
    warmup: int
    sl_metrics: dict = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=list)
    regime_names: list[str] = field(default_factory=list)
    lookback: int = 24
    """Bars in one observation window."""
    embargo: int = 24
    """Bars between consecutive splits."""


# ---------------------------------------------------------------------------------------------------------------
# Synthetic market
# ---------------------------------------------------------------------------------------------------------------
# Per bar t and symbol s (all arrays vectorised over symbols; the only Python loops run over time):
#   u[t, s]  = beta_s * m[t] + gamma_s * f[t, sector(s)] + e[t, s]       market, sector and idiosyncratic shocks
#   each shock = scale * regime_mult[regime(t)] * intraday_mult[hour(t)] * sqrt(h[t]) * z[t],
#   z ~ Student-t(4) scaled to unit variance and clipped at +-8, h[t] = GARCH(1,1) variance with unit mean (alpha
#   0.08, beta 0.90) capped at 9,
#   sd[t, s] = the conditional standard deviation of u[t, s] given h, regime and hour; w = u / sd has variance 1.
#   x[t, s]  = rho * x[t-1, s] + sqrt(1 - rho^2) * w[t, s]                 planted predictable component
#   r[t, s]  = drift(regime) * beta_s + sd[t, s] * x[t, s]                 log return of bar t
# With rho = signal_strength, the standardised return x[t] = (r[t] - drift) / sd[t] is an AR(1): the best causal
# forecast of x[t+1] is rho * x[t], which explains exactly rho^2 of its variance (rho = 0: pure noise, no edge).
# A classifier of sign(r[t+1]) from x[t] has, for Gaussian shocks, AUC = 1/2 + arcsin(rho) / pi (0.532 at rho 0.1,
# 0.667 at rho 0.5); the fat tails move this slightly. The technical features see x[t] through ret_1 divided by the
# realised volatility.
# Regimes follow a daily Markov chain (bull, bear, crisis) that scales volatility and drift; with regime_foresight
# > 0, sector and idiosyncratic volatility rise on the last WARNING_DAYS bull days before a downturn (a warning in
# the cross-section, not in the benchmark). Volume grows with |x|; the first bar of a day carries an overnight gap
# (part of its return happens between close and open).
# Edge regime (edge_regime != "off"): a hidden daily state e(d) in {M = 0 momentum, R = 1 reversal}, a Markov chain
# independent of the volatility regimes, P(M -> R) = 0.025, P(R -> M) = 0.10, starting in M (R on 20% of days, mean
# spells 40 and 10 days), drawn from its own generator default_rng([seed, 7]) so that "off" changes no other draw:
#   flip       x[t, s] = rho_t * x[t-1, s] + sqrt(1 - rho^2) * w[t, s], rho_t = +rho on M days, -rho on R days
#              (var x = 1 and |lag-1 autocorrelation| = rho in both states), announced: on R days and on the
#              ANNOUNCE_DAYS days before each M -> R onset, sd_f and sd_e x ANNOUNCE_SCALE (0.5), sd_m unchanged, so
#              the average pairwise correlation of returns rises from ~0.3 to ~0.5 and the benchmark does not move
#   placebo-a  the flips of e; the announcement follows an independent copy of the chain (same law, own draws)
#   placebo-b  the announcement of e; no flips (rho_t = rho everywhere)
# The announcement's factor multiplies the foresight warning's (1 + 2 x foresight). cross_section_features reads it.
# Lead-lag market (lead_lag = kappa, not None; rho must be 0): K = ceil(S / LEAD_LAG_SECTOR_SIZE) sectors, symbol s in
# sector s mod K, the leader of sector k its first symbol, k; e[t, s] = the idiosyncratic shock z of symbol s (unit
# variance, independent of every other shock and of its own past), the news in its return that no other symbol shares:
#   x[t, l] = w[t, l]                                                     a leader
#   x[t, f] = kappa * e[t-1, leader(f)] + sqrt(1 - kappa^2) * w[t, f]     a follower
# var x = 1 for every symbol, and every symbol's own autocorrelation (and the benchmark's forecast of it) is exactly 0
# at every lag: the lead term is independent of the follower's past. The leader's whole standardised return w[t-1, l]
# would not do: it shares the market and sector shocks with w[t-1, f] (correlation c ~0.3), which would give the
# follower an own lag-1 autocorrelation kappa sqrt(1 - kappa^2) c and the lagged benchmark a forecast. The leader's
# standardised return predicts the follower's next one with correlation kappa x E[q], q = sd_e / sd the leader's
# idiosyncratic share of its volatility (~0.8 on average). kappa = 0 is the placebo: the same sectors and draws, x = w.
# No extra draws: placebo and lead share every array but the followers' returns; lead_lag None leaves K = 11 and the
# market byte for byte as before.

REGIME_NAMES_SYNTH = ("bull", "bear", "crisis")
_REGIME_TRANSITIONS = np.array([[0.990, 0.008, 0.002], [0.030, 0.960, 0.010], [0.060, 0.040, 0.900]])
_REGIME_DRIFT = np.array([0.15, -0.15, -0.60])  # annualised market drift per regime
_REGIME_MARKET_VOL = np.array([1.0, 1.5, 3.0])
_REGIME_OTHER_VOL = np.array([1.0, 1.2, 1.8])
_INTRADAY_VOL = np.array([1.6, 1.1, 0.9, 0.85, 0.9, 1.0, 1.3])  # U-shaped, 7 hourly bars from 09:30 New York
_INTRADAY_VOLUME = np.array([1.8, 1.1, 0.9, 0.8, 0.85, 1.0, 1.5])
_SYNTH_BARS_PER_DAY = 7
# Student-t(4) shocks have no fourth moment, so the GARCH variance they drive has none either: unbounded, a 10-year
# sample once produced a +240% hourly bar. Shocks are clipped at 8 standard deviations and the conditional variance
# at 9x its mean (volatility at most 3x), which keeps fat tails and clustering without absurd bars.
SHOCK_CLIP = 8.0
GARCH_H_MAX = 9.0
_SYNTH_DAYS_PER_YEAR = 252
WARNING_DAYS = 5  # regime foresight: days of rising dispersion before a downturn
EDGE_REGIMES = ("off", "flip", "placebo-a", "placebo-b")
_EDGE_TRANSITIONS = np.array([[0.975, 0.025], [0.10, 0.90]])  # M, R: stationary R share 0.025 / 0.125 = 0.2
ANNOUNCE_DAYS = 3  # edge regime: days before an M -> R onset on which the announcement already shows
ANNOUNCE_SCALE = 0.5  # edge regime: sector and idiosyncratic volatility factor on announced days
LEAD_LAG_SECTOR_SIZE = 5  # lead-lag market: symbols per sector (one leader, four followers)


def _daily_chain(u: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """(D,) int8 Markov chain started in state 0, driven by uniforms u (D,) (u[0] unused). One loop over days."""
    cum = np.cumsum(transitions, axis=1)
    chain = np.zeros(len(u), dtype=np.int8)
    for d in range(1, len(u)):
        chain[d] = np.searchsorted(cum[chain[d - 1]], u[d], side="right")
    return chain


def downturn_warning(day_regime: np.ndarray, days: int = WARNING_DAYS) -> np.ndarray:
    """(D,) bool: the bull days among the `days` days before each start of a bear or crisis regime."""
    onset = np.flatnonzero((day_regime[1:] > 0) & (day_regime[:-1] == 0)) + 1
    warn = np.zeros(len(day_regime), dtype=bool)
    for d in onset:
        warn[max(d - days, 0) : d] = True
    return warn & (day_regime == 0)


def edge_announcement(day_edge: np.ndarray, days: int = ANNOUNCE_DAYS) -> np.ndarray:
    """(D,) bool: the R days of a daily edge chain (D,) plus the `days` days before each M -> R onset."""
    onset = np.zeros(len(day_edge), dtype=bool)
    onset[1:] = (day_edge[1:] == 1) & (day_edge[:-1] == 0)
    announced = day_edge == 1
    for k in range(1, days + 1):  # day d is announced if an onset comes k days later
        announced[:-k] |= onset[k:]
    return announced


def synthetic_symbol_names(num_symbols: int) -> list[str]:
    """Synthetic names (SYN000, SYN001, ...) so that synthetic data is never shown under a real ticker."""
    width = max(3, len(str(num_symbols - 1)))
    return [f"SYN{i:0{width}d}" for i in range(num_symbols)]


def _exchange_holidays(first: str, last: str) -> np.ndarray:
    """(H,) datetime64[D] the ten US equity-exchange holidays (New Year's Day, Martin Luther King Jr. Day, Washington's
    Birthday, Good Friday, Memorial Day, Juneteenth from 2022, Independence Day, Labor Day, Thanksgiving, Christmas;
    a Saturday holiday is observed on the Friday before, a Sunday one on the Monday after) between two dates."""
    from pandas.tseries import holiday as h

    rules = [
        h.Holiday("New Year's Day", month=1, day=1, observance=h.sunday_to_monday),
        h.USMartinLutherKingJr,
        h.USPresidentsDay,
        h.GoodFriday,
        h.USMemorialDay,
        h.Holiday("Juneteenth", month=6, day=19, start_date="2022-01-01", observance=h.nearest_workday),
        h.Holiday("Independence Day", month=7, day=4, observance=h.nearest_workday),
        h.USLaborDay,
        h.USThanksgivingDay,
        h.Holiday("Christmas", month=12, day=25, observance=h.nearest_workday),
    ]
    calendar = type("ExchangeCalendar", (h.AbstractHolidayCalendar,), {"rules": rules})()
    return calendar.holidays(first, last).to_numpy().astype("datetime64[D]")


def _synthetic_calendar(years: float, start: str = "2022-01-03") -> np.ndarray:
    """(T,) datetime64[ns] UTC bar-open times: 7 hourly bars a session from 14:30 UTC (09:30 New York, EST), on
    weekdays that are not exchange holidays: about 252 sessions a year, the year the generator's volatilities and
    drifts are stated in (so that the calendar inferred from the timestamps agrees with bars_per_year = 7 x 252)."""
    n_days = max(1, int(round(years * _SYNTH_DAYS_PER_YEAR)))
    last = np.datetime64(start, "D") + int(n_days / 240 * 366) + 30  # past the last session, holidays included
    hol = _exchange_holidays(start, str(last))
    days = np.busday_offset(np.datetime64(start, "D"), np.arange(n_days), roll="forward", holidays=hol)
    offsets = np.timedelta64(14 * 60 + 30, "m") + np.arange(_SYNTH_BARS_PER_DAY) * np.timedelta64(60, "m")
    ts = days.astype("datetime64[m]")[:, None] + offsets[None, :]
    return ts.reshape(-1).astype("datetime64[ns]")


def _garch_unit(z: np.ndarray, alpha: float = 0.08, beta: float = 0.90, h_max: float = GARCH_H_MAX) -> np.ndarray:
    """GARCH(1,1) with unit unconditional variance driven by shocks z (T, C); returns sqrt(h) (T, C), h[t] known
    before z[t] is drawn, h capped at h_max. One loop over time, vectorised over the C series."""
    omega = 1.0 - alpha - beta
    out = np.empty_like(z)
    h = np.ones(z.shape[1])
    for t in range(z.shape[0]):
        s = np.sqrt(h)
        out[t] = s
        h = np.minimum(omega + alpha * (s * z[t]) ** 2 + beta * h, h_max)
    return out


def check_synthetic_flags(
    signal_strength: float,
    gap_rate: float,
    regime_foresight: float,
    edge_regime: str = "off",
    lead_lag: float | None = None,
) -> None:
    """The synthetic market's own settings, checked before any work (a UserInputError names the flag)."""
    if not 0.0 <= signal_strength < 1.0:
        raise UserInputError(f"--data.signal-strength {signal_strength} must lie in [0, 1); 0 is pure noise.")
    if not 0.0 <= gap_rate < 0.5:
        raise UserInputError(f"--data.gap-rate {gap_rate} must lie in [0, 0.5).")
    if not 0.0 <= regime_foresight <= 1.0:
        raise UserInputError(f"--data.regime-foresight {regime_foresight} must lie in [0, 1]; 0 gives no warning.")
    if edge_regime not in EDGE_REGIMES:
        raise UserInputError(f"--data.edge-regime {edge_regime!r}: use one of {EDGE_REGIMES} (off: no edge regime).")
    if lead_lag is not None:
        if not 0.0 <= lead_lag < 1.0:
            raise UserInputError(
                f"--data.lead-lag {lead_lag} must lie in [0, 1); 0 is the placebo (the sectors without the lead), and "
                "leaving the flag out turns the lead-lag market off."
            )
        if signal_strength != 0.0:
            raise UserInputError(
                f"--data.lead-lag {lead_lag} plants its edge across symbols only, so no symbol's own returns may be "
                f"autocorrelated; --data.signal-strength is {signal_strength}: add --data.signal-strength 0."
            )
        if edge_regime != "off":
            raise UserInputError(
                f"--data.lead-lag and --data.edge-regime {edge_regime} are two different markets; drop one of them."
            )


def lead_lag_leaders(num_symbols: int) -> np.ndarray:
    """(S,) int64 the lead-lag market's leader of each symbol: K = ceil(S / LEAD_LAG_SECTOR_SIZE) sectors, symbol s in
    sector s mod K, whose leader is its first symbol, s mod K (a leader maps to itself)."""
    num_sectors = -(-num_symbols // LEAD_LAG_SECTOR_SIZE)
    return np.arange(num_symbols, dtype=np.int64) % num_sectors


def generate_synthetic_market(
    num_symbols: int = 10,
    years: float = 10.0,
    seed: int = 0,
    signal_strength: float = 0.3,
    gap_rate: float = 0.0,
    num_sectors: int = 11,
    regime_foresight: float = 0.0,
    edge_regime: str = "off",
    lead_lag: float | None = None,
) -> MarketData:
    """Seeded synthetic hourly market (see the model above). The same arguments give identical arrays; edge_regime
    "off" gives the same arrays as before the edge regime existed (its chain has its own generator), and lead_lag
    None the same as before the lead-lag market existed (with lead_lag, num_sectors is ceil(S / 5))."""
    if num_symbols < 1:
        raise UserInputError(f"--data.num-symbols {num_symbols}: the synthetic market needs at least 1 symbol.")
    check_synthetic_flags(signal_strength, gap_rate, regime_foresight, edge_regime, lead_lag)
    rng = np.random.default_rng(seed)
    ts = _synthetic_calendar(years)
    leaders = None if lead_lag is None else lead_lag_leaders(num_symbols)  # (S,)
    T, S = len(ts), num_symbols
    K = min(num_sectors, num_symbols) if leaders is None else int(leaders.max()) + 1
    bpy = _SYNTH_BARS_PER_DAY * _SYNTH_DAYS_PER_YEAR

    # hidden daily regime chain, repeated over the bars of each day
    n_days = T // _SYNTH_BARS_PER_DAY
    day_reg = _daily_chain(rng.random(n_days), _REGIME_TRANSITIONS)
    regime = np.repeat(day_reg, _SYNTH_BARS_PER_DAY)  # (T,)
    hour = np.tile(np.arange(_SYNTH_BARS_PER_DAY), n_days)  # (T,)
    warning = np.repeat(downturn_warning(day_reg), _SYNTH_BARS_PER_DAY)  # (T,) bull bars shortly before a downturn

    # hidden daily edge state (M / R) from its own generator, so that "off" leaves rng's draws as they were
    edge_day = None
    flip = np.ones(T)  # (T,) sign of the planted autocorrelation
    announce = np.zeros(T, dtype=bool)  # (T,) bars with sector and idiosyncratic volatility x ANNOUNCE_SCALE
    if edge_regime != "off":
        u_edge = np.random.default_rng([seed, 7]).random((2, n_days))  # the chain and placebo-a's independent copy
        edge_day = _daily_chain(u_edge[0], _EDGE_TRANSITIONS)
        if edge_regime != "placebo-b":
            flip = np.where(np.repeat(edge_day, _SYNTH_BARS_PER_DAY) == 1, -1.0, 1.0)
        herald = _daily_chain(u_edge[1], _EDGE_TRANSITIONS) if edge_regime == "placebo-a" else edge_day
        announce = np.repeat(edge_announcement(herald), _SYNTH_BARS_PER_DAY)

    # static symbol parameters
    sector = np.arange(S) % K
    beta = rng.uniform(0.7, 1.3, S)
    gamma = rng.uniform(0.5, 1.0, S)
    idio_scale = rng.uniform(0.8, 1.2, S) * 0.30 / np.sqrt(bpy)
    market_scale, sector_scale = 0.16 / np.sqrt(bpy), 0.10 / np.sqrt(bpy)

    # shocks: Student-t(4) scaled to unit variance, GARCH(1,1) per series (market, K sectors, S idiosyncratic)
    df = 4.0
    z = np.clip(rng.standard_t(df, size=(T, 1 + K + S)) / np.sqrt(df / (df - 2.0)), -SHOCK_CLIP, SHOCK_CLIP)
    g = _garch_unit(z)  # (T, C) conditional sd
    reg_m = _REGIME_MARKET_VOL[regime] * _INTRADAY_VOL[hour]  # (T,)
    reg_o = _REGIME_OTHER_VOL[regime] * _INTRADAY_VOL[hour] * (1.0 + 2.0 * regime_foresight * warning)
    reg_o = reg_o * np.where(announce, ANNOUNCE_SCALE, 1.0)  # x1.0 exactly when nothing is announced
    sd_m = market_scale * reg_m * g[:, 0]  # (T,)
    sd_f = sector_scale * reg_o[:, None] * g[:, 1 : 1 + K]  # (T, K)
    sd_e = idio_scale[None, :] * reg_o[:, None] * g[:, 1 + K :]  # (T, S)
    m = sd_m * z[:, 0]
    f = sd_f * z[:, 1 : 1 + K]
    u = beta[None, :] * m[:, None] + gamma[None, :] * f[:, sector] + sd_e * z[:, 1 + K :]  # (T, S)
    sd = np.sqrt((beta[None, :] * sd_m[:, None]) ** 2 + (gamma[None, :] * sd_f[:, sector]) ** 2 + sd_e**2)
    w = u / sd

    # planted predictable component: AR(1) in standardised returns, its coefficient's sign flipped on R bars
    rho = float(signal_strength)
    rho_t = rho * flip  # (T,)
    x = np.empty_like(w)
    prev = np.zeros(S)
    scale = np.sqrt(1.0 - rho**2)
    for t in range(T):
        prev = rho_t[t] * prev + scale * w[t]
        x[t] = prev
    if leaders is not None:  # lead-lag (rho = 0, so x = w here): followers load kappa on their leader's last news
        kappa, follow = float(lead_lag), np.flatnonzero(leaders != np.arange(S))
        news = z[:, 1 + K :][:, leaders[follow]]  # (T, F) each follower's leader's idiosyncratic shock
        x[1:, follow] = kappa * news[:-1] + np.sqrt(1.0 - kappa**2) * x[1:, follow]
    drift = (_REGIME_DRIFT[regime] / bpy)[:, None] * beta[None, :]  # (T, S)
    r = drift + sd * x

    # prices: part of the first bar's return is an overnight gap between the previous close and the open
    p0 = np.exp(rng.uniform(np.log(20.0), np.log(200.0), S))
    close = p0[None, :] * np.exp(np.cumsum(r, axis=0))
    prev_close = np.vstack([p0[None, :], close[:-1]])
    gap_frac = np.where(hour == 0, 0.6, 0.0)[:, None]
    noise = rng.standard_normal((3, T, S))
    open_ = prev_close * np.exp(gap_frac * r + 0.05 * sd * noise[2])  # small tick noise between bars
    excursion = np.abs(noise[:2]) * 0.5 * sd
    high = np.maximum(open_, close) * np.exp(excursion[0])
    low = np.minimum(open_, close) * np.exp(-excursion[1])
    base_volume = np.exp(rng.uniform(np.log(2e5), np.log(5e6), S))
    volume = (
        base_volume[None, :]
        * _INTRADAY_VOLUME[hour][:, None]
        * (0.4 + 0.8 * np.abs(x))
        * np.exp(0.3 * rng.standard_normal((T, S)))
    )
    volume = np.maximum(np.round(volume), 1.0)

    # halts: runs of 1-7 missing bars starting at rate gap_rate / 4 (mean run length 4)
    tradable = np.ones((T, S), dtype=bool)
    if gap_rate > 0:
        starts = rng.random((T, S)) < gap_rate / 4.0
        lengths = rng.integers(1, 8, size=(T, S))
        for k in range(7):
            hit = starts[: T - k] & (lengths[: T - k] > k)
            tradable[k:][hit] = False
        for a in (open_, high, low, close, volume):
            a[~tradable] = np.nan

    benchmark = 1000.0 * np.exp(np.cumsum(_REGIME_DRIFT[regime] / bpy + m))
    return MarketData(
        timestamps=ts,
        symbols=synthetic_symbol_names(S),
        open=open_,
        high=high,
        low=low,
        close=close,
        volume=volume,
        tradable=tradable,
        benchmark=benchmark,
        benchmark_name="SYNIDX",
        bars_per_day=float(_SYNTH_BARS_PER_DAY),
        bars_per_year=float(bpy),
        regime_labels=regime.astype(np.int8),
        edge_labels=None if edge_day is None else np.repeat(edge_day, _SYNTH_BARS_PER_DAY).astype(np.int8),
        leader_map=leaders,
        source="synthetic",
    )


# ---------------------------------------------------------------------------------------------------------------
# User data: loaders, validation, calendar alignment
# ---------------------------------------------------------------------------------------------------------------
# Accepted layouts: a folder of per-symbol files (SYMBOL.parquet, SYMBOL.csv; the file stem is the symbol) or one
# long-format parquet with a symbol column. Column names are matched case-insensitively with the aliases below;
# naive timestamps are read in DataConfig.timezone and everything is converted to UTC.

_ALIASES = {
    "timestamp": ("timestamp", "datetime", "date_time", "date time", "time", "date", "ts", "unnamed: 0", ""),
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c", "last"),
    "volume": ("volume", "vol", "v"),
    "adj_close": ("adj close", "adj_close", "adjclose", "adjusted close", "adjusted_close"),
    "symbol": ("symbol", "ticker", "tic", "asset", "instrument"),
}
BAD_BAR_POLICIES = ("raise", "drop", "repair")
_NON_MONOTONIC = "timestamp earlier than a previous row (timestamps must increase)"
_FIX = "Correct the file, or opt in to --data.bad-bars drop (remove such bars) or repair (fix what can be fixed)."


class DataValidationError(UserInputError):
    """Bad user data: the message names the file, the row and the problem, and says how to fix it."""


DATA_SUFFIXES = (".csv", ".parquet")  # the bar files --data.source accepts (a folder's other files are ignored)


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataValidationError(
            f"{path}: a {path.suffix or 'suffix-less'} file; bar files are CSV (.csv) or parquet (.parquet). "
            "Rename or convert it."
        )
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as err:  # any reader failure means the file is unusable; say which file and why
        raise DataValidationError(
            f"Could not read {path}: {type(err).__name__}: {err}. The file looks corrupt or is not a "
            f"{path.suffix.lstrip('.')} file; re-export it or remove it from the data folder."
        ) from err


def _find_column(columns: dict[str, str], field_name: str) -> str | None:
    for alias in _ALIASES[field_name]:
        if alias in columns:
            return columns[alias]
    return None


def _standardize(df: pd.DataFrame, where: str, cfg: DataConfig, need_symbol: bool = False) -> pd.DataFrame:
    """Columns renamed to timestamp (UTC, naive datetime64[ns]), open, high, low, close, volume (+ symbol)."""
    if isinstance(df.index, pd.DatetimeIndex) and df.index.name is not None:
        df = df.reset_index()
    columns = {str(c).strip().lower(): c for c in df.columns}
    out = pd.DataFrame(index=df.index)
    if "date" in columns and "time" in columns and not any(a in columns for a in ("timestamp", "datetime")):
        raw_ts = df[columns["date"]].astype(str) + " " + df[columns["time"]].astype(str)
    else:
        ts_col = _find_column(columns, "timestamp")
        if ts_col is None:
            raise DataValidationError(
                f"{where}: no timestamp column (looked for {', '.join(a for a in _ALIASES['timestamp'] if a)}); "
                f"found columns {list(df.columns)}. Rename the time column to 'timestamp'."
            )
        raw_ts = df[ts_col]
    out["timestamp"] = _to_utc(raw_ts, where, cfg.timezone)
    out["_row"] = np.arange(1, len(df) + 1)  # the bar's row in the file (1-based, header excluded), for errors
    for name in ("open", "high", "low", "close", "volume"):
        col = _find_column(columns, name)
        if col is None:
            raise DataValidationError(
                f"{where}: missing column '{name}' (case-insensitive; aliases {list(_ALIASES[name])}); found "
                f"columns {list(df.columns)}. Add the column or rename it."
            )
        values = pd.to_numeric(df[col], errors="coerce").astype(np.float64)
        text = values.isna() & df[col].notna()  # present but not a number: "$100.06", "1,234", "n/a"
        if text.any():
            row = int(np.flatnonzero(text.to_numpy())[0]) + 1
            raise DataValidationError(
                f"{where}: column '{col}' is not numeric (row {row}: {df[col].iloc[row - 1]!r}); store plain numbers "
                "(no currency signs, thousands separators or text) and reload."
            )
        out[name] = values
    if cfg.adjusted:
        col = _find_column(columns, "adj_close")
        if col is None:
            raise DataValidationError(
                f"{where}: adjusted=True but there is no Adj Close column; drop --data.adjusted or add the column."
            )
        factor = pd.to_numeric(df[col], errors="coerce").astype(np.float64) / out["close"]
        for name in ("open", "high", "low", "close"):
            out[name] = out[name] * factor
    if need_symbol:
        col = _find_column(columns, "symbol")
        if col is None:
            raise DataValidationError(
                f"{where}: a long-format file needs a symbol column (aliases {list(_ALIASES['symbol'])}); found "
                f"{list(df.columns)}. Add it, or split the data into one file per symbol in a folder."
            )
        out["symbol"] = df[col].astype(str)
    return out.reset_index(drop=True)


def _to_utc(values: pd.Series, where: str, timezone: str) -> pd.Series:
    """Timestamps as naive UTC datetime64[ns]. Aware values (an offset or a zone) are converted to UTC, also when the
    offset changes within the file (a daylight-saving switch, as most intraday vendors export New York time); naive
    values are read in `timezone`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # format inference chatter
        try:
            ts = pd.to_datetime(values, errors="coerce")
        except (ValueError, TypeError):  # pandas 3: "Mixed timezones detected" for offsets that change
            ts = None
        if ts is None or ts.dtype == object:  # mixed offsets: let pandas convert each to UTC
            ts = pd.to_datetime(values, errors="coerce", utc=True)
    if ts.dt.tz is None:
        ts = ts.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
    ts = ts.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]")
    bad = ts.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise DataValidationError(
            f"{where}: row {i + 1} has an unreadable or ambiguous timestamp {values.iloc[i]!r}. Write timestamps as "
            f"ISO 8601 (e.g. 2024-01-02 14:30:00+00:00), or set --data.timezone for naive local times."
        )
    return ts


def _bad_rows(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Boolean masks (N,) of every problem a row can have, in the order they are reported."""
    ts = df["timestamp"].to_numpy()
    o, h, l, c, v = (df[k].to_numpy() for k in ("open", "high", "low", "close", "volume"))
    prev_max = np.maximum.accumulate(ts)
    earlier = np.r_[False, ts[1:] <= prev_max[:-1]]
    dup = df["timestamp"].duplicated(keep="first").to_numpy()
    with np.errstate(invalid="ignore"):
        return {
            "duplicate timestamp": dup,
            _NON_MONOTONIC: earlier & ~dup,
            "NaN in open/high/low/close/volume": ~np.isfinite(np.c_[o, h, l, c, v]).all(axis=1),
            "non-positive price": (np.c_[o, h, l, c] <= 0).any(axis=1),
            "high below max(open, close)": h < np.fmax(o, c),
            "low above min(open, close)": l > np.fmin(o, c),
            "negative volume": v < 0,
        }


def validate_bars(df: pd.DataFrame, where: str, policy: str) -> pd.DataFrame:
    """Check one symbol's standardised bars; raise on the first bad row, or drop / repair them (counts warned)."""
    if policy not in BAD_BAR_POLICIES:
        raise UserInputError(f"--data.bad-bars {policy!r}: use one of {BAD_BAR_POLICIES}.")
    problems = _bad_rows(df)
    if policy == "raise":
        for problem, mask in problems.items():
            if mask.any():
                i = int(np.argmax(mask))
                row = df.iloc[i]
                values = ", ".join(f"{k}={row[k]}" for k in ("open", "high", "low", "close", "volume"))
                line = int(row["_row"]) if "_row" in df else i + 1
                raise DataValidationError(
                    f"{where}: row {line} (timestamp {row['timestamp']}): {problem} ({values}). {_FIX}"
                )
        return df
    counts = {}
    if policy == "drop":
        bad = np.zeros(len(df), dtype=bool)
        for problem, mask in problems.items():
            counts[problem] = int((mask & ~bad).sum())
            bad |= mask
        df = df[~bad]
    else:  # repair: order by time (a later duplicate is taken as the correction), widen high/low, zero negative volume
        df = df.sort_values("timestamp", kind="stable").drop_duplicates("timestamp", keep="last")
        out_of_order = problems["duplicate timestamp"] | problems[_NON_MONOTONIC]
        counts["duplicate or out-of-order timestamp (sorted, last kept)"] = int(out_of_order.sum())
        unfixable = ~np.isfinite(df[["open", "high", "low", "close", "volume"]].to_numpy()).all(axis=1)
        unfixable |= (df[["open", "high", "low", "close"]].to_numpy() <= 0).any(axis=1)
        counts["NaN or non-positive price/volume (dropped, cannot be repaired)"] = int(unfixable.sum())
        df = df[~unfixable].copy()
        hi, lo = df[["open", "close"]].max(axis=1), df[["open", "close"]].min(axis=1)
        counts["high raised to max(open, close)"] = int((df["high"] < hi).sum())
        counts["low lowered to min(open, close)"] = int((df["low"] > lo).sum())
        counts["negative volume set to 0"] = int((df["volume"] < 0).sum())
        df["high"], df["low"] = np.fmax(df["high"], hi), np.fmin(df["low"], lo)
        df["volume"] = df["volume"].clip(lower=0.0)
    counts = {k: n for k, n in counts.items() if n}
    if counts:
        summary = "; ".join(f"{n} x {k}" for k, n in counts.items())
        warnings.warn(f"{where}: bad_bars={policy}: {summary}.", stacklevel=3)
    return df.reset_index(drop=True)


def _user_frames(cfg: DataConfig) -> dict[str, tuple[str, pd.DataFrame]]:
    """symbol -> (where, standardised and validated bars) for the folder or long-parquet source."""
    path = Path(cfg.source)
    frames = {}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataValidationError(
                f"The data folder {path} holds no .parquet or .csv files; put one file per symbol there "
                f"(e.g. {path}/SPY.parquet) or point --data.source at a long-format parquet."
            )
        for p in files:
            if cfg.symbols is not None and p.stem not in cfg.symbols and p.stem != cfg.benchmark:
                continue
            if p.stem in frames:
                raise DataValidationError(f"{path}: symbol {p.stem} has both a parquet and a CSV file; keep one.")
            frames[p.stem] = (str(p), validate_bars(_standardize(_read_table(p), str(p), cfg), str(p), cfg.bad_bars))
    elif path.is_file():
        table = _read_table(path)
        if _find_column({str(c).strip().lower(): c for c in table.columns}, "symbol") is None:  # one symbol
            frames[path.stem] = (str(path), validate_bars(_standardize(table, str(path), cfg), str(path), cfg.bad_bars))
        else:  # long format: one row per (timestamp, symbol)
            long = _standardize(table, str(path), cfg, need_symbol=True)
            for sym, part in long.groupby("symbol", sort=True):
                if cfg.symbols is not None and sym not in cfg.symbols and sym != cfg.benchmark:
                    continue
                where = f"{path} (symbol {sym})"
                frames[str(sym)] = (
                    where,
                    validate_bars(part.drop(columns="symbol").reset_index(drop=True), where, cfg.bad_bars),
                )
    else:
        raise DataValidationError(
            f"Data source {path} does not exist. Pass --data.source synthetic, one bar file (CSV or parquet; the "
            "file name is the symbol), a folder of per-symbol files, or a long-format file with a symbol column."
        )
    if cfg.symbols is not None:
        missing = [s for s in cfg.symbols if s not in frames]
        if missing:
            raise DataValidationError(f"{path}: no data for requested symbols {missing}; found {sorted(frames)}.")
    return frames


def infer_calendar(timestamps: np.ndarray) -> tuple[float, float]:
    """(bars_per_day, bars_per_year) from the timestamps themselves: the median number of bars on a date with data,
    and bars per 365.25 calendar days over the sample (hourly US equities ~1764, daily equities ~252, 24/7 ~8766)."""
    ts = pd.DatetimeIndex(timestamps)
    if len(ts) < 2:
        raise DataValidationError("Need at least two bars to infer the calendar.")
    bars_per_day = float(pd.Series(ts.normalize()).value_counts().median())
    seconds = (ts - ts[0]).total_seconds().to_numpy()  # whatever the resolution (ns, us, ms, s) of the timestamps
    step = np.median(np.diff(seconds))
    span_days = (seconds[-1] + step) / 86_400.0
    return bars_per_day, float(len(ts) / span_days * 365.25)


def equal_weight_index(close: np.ndarray) -> np.ndarray:
    """(T,) an investable equal-weight index of the (T, S) closes: equal amounts of every symbol priced on the first
    bar that has any price, bought there once and held, never rebalanced (a basket that trades once pays its entry
    costs once; one rebalanced every bar would trade every bar for free). A symbol whose data ends is held at its
    last close (as cash); symbols that list later do not enter, since adding them would need a rebalance. The
    equal-weight buy-and-hold baseline buys the same kind of basket at the start of its own window."""
    c = pd.DataFrame(close).ffill().to_numpy()  # (T, S) each symbol at its last known close
    priced = np.isfinite(c).any(1)
    if not priced.any():
        return np.full(len(close), 100.0)
    first = int(np.argmax(priced))
    members = np.isfinite(c[first])
    value = (c[:, members] / c[first, members]).mean(1)  # (T,) one dollar split equally at bar `first`
    return 100.0 * np.where(np.arange(len(close)) < first, 1.0, value)


def load_user_market(cfg: DataConfig) -> MarketData:
    """Load, validate and align the user's bars on the union calendar; missing bars are NaN and not tradable."""
    frames = _user_frames(cfg)
    if cfg.benchmark is not None and cfg.benchmark not in frames:
        raise DataValidationError(
            f"Benchmark symbol {cfg.benchmark!r} is not in {cfg.source} (symbols found: {sorted(frames)}); "
            f"add its file or choose one of those with --data.benchmark."
        )
    symbols = list(cfg.symbols) if cfg.symbols is not None else sorted(frames)
    ts = np.unique(np.concatenate([f["timestamp"].to_numpy("datetime64[ns]") for _, f in frames.values()]))
    need = feature_warmup() + cfg.lookback + cfg.min_episode_bars
    panels = {k: np.full((len(ts), len(symbols)), np.nan) for k in ("open", "high", "low", "close", "volume")}
    for j, sym in enumerate(symbols):
        where, f = frames[sym]
        if len(f) < need:
            raise DataValidationError(
                f"{where}: only {len(f)} valid bars; at least {need} are needed (warm-up {feature_warmup()} + "
                f"lookback {cfg.lookback} + one episode of {cfg.min_episode_bars}). Add history, lower "
                f"--data.lookback / --data.min-episode-bars, or leave the symbol out with --data.symbols."
            )
        idx = np.searchsorted(ts, f["timestamp"].to_numpy("datetime64[ns]"))
        for k in panels:
            panels[k][idx, j] = f[k].to_numpy()
    tradable = np.isfinite(panels["close"])  # bars without volume are also not tradable: the env decides that
    has_bar = np.isfinite(panels["close"])
    last = len(ts) - 1 - np.argmax(has_bar[::-1], axis=0)  # (S,) each symbol's last bar
    ended = [sym for j, sym in enumerate(symbols) if last[j] < len(ts) - 1]  # as the core: delisted after `last`
    if ended:
        warnings.warn(
            f"Symbols {ended[:10]} end before the sample does ({ts[-1]}): each is treated as delisted after its last "
            "bar, where its position is closed at the last close, with costs, and its slot stops trading.",
            stacklevel=2,
        )
    if cfg.benchmark is not None:
        _, bf = frames[cfg.benchmark]
        bench = pd.Series(bf["close"].to_numpy(), index=bf["timestamp"].to_numpy("datetime64[ns]"))
        benchmark = bench.reindex(ts).ffill().bfill().to_numpy()
        name = cfg.benchmark
    else:
        benchmark, name = equal_weight_index(panels["close"]), "EQUAL_WEIGHT"
    bars_per_day, bars_per_year = infer_calendar(ts)
    return MarketData(
        timestamps=ts,
        symbols=symbols,
        **panels,
        tradable=tradable,
        benchmark=benchmark,
        benchmark_name=name,
        bars_per_day=bars_per_day,
        bars_per_year=bars_per_year,
        source=str(cfg.source),
    )


# ---------------------------------------------------------------------------------------------------------------
# Features (all causal: the value at bar t uses bars <= t only)
# ---------------------------------------------------------------------------------------------------------------
# Raw per-bar features computed on the (T, S) panel. Missing bars are treated as flat bars at the last close (zero
# return, no range) for the rolling windows of price features, and volume windows skip them; the observation of a
# missing bar itself is set to 0 and the bar is not tradable. Windows count bars, not days.
#
# | idx | name         | formula (c close, o open, h high, l low, v volume, r = log(c_t / c_{t-1}))   | warm-up |
# |-----|--------------|-------------------------------------------------------------------------------|---------|
# | 0   | ret_1        | r_t                                                                           | 1       |
# | 1   | ret_3        | log(c_t / c_{t-3})                                                            | 3       |
# | 2   | ret_7        | log(c_t / c_{t-7}) (one trading day of hourly bars)                           | 7       |
# | 3   | ret_35       | log(c_t / c_{t-35}) (one week)                                                | 35      |
# | 4   | range        | (h - l) / c                                                                   | 0       |
# | 5   | body         | (c - o) / (h - l), 0 when h = l                                               | 0       |
# | 6   | upper_wick   | (h - max(o, c)) / (h - l), 0 when h = l                                       | 0       |
# | 7   | lower_wick   | (min(o, c) - l) / (h - l), 0 when h = l                                       | 0       |
# | 8   | gap          | log(o_t / c_{t-1})                                                            | 1       |
# | 9   | volume_ratio | log(v_t / mean(v, 35))                                                        | 35      |
# | 10  | volume_trend | log(mean(v, 7) / mean(v, 35))                                                 | 35      |
# | 11  | rsi_14       | (RSI_14 - 50) / 50, Wilder smoothing (EMA alpha 1/14) of gains and losses     | 14      |
# | 12  | macd         | (EMA_12(c) - EMA_26(c)) / c                                                   | 26      |
# | 13  | macd_signal  | EMA_9(macd)                                                                   | 34      |
# | 14  | macd_hist    | macd - macd_signal                                                            | 34      |
# | 15  | bb_position  | (c - SMA_20) / (2 std_20(c))                                                  | 20      |
# | 16  | bb_width     | 4 std_20(c) / SMA_20                                                          | 20      |
# | 17  | atr_14       | Wilder ATR_14 / c, true range max(h - l, abs(h - c_{t-1}), abs(l - c_{t-1}))  | 14      |
# | 18  | ma_dist_7    | c / SMA_7 - 1                                                                 | 7       |
# | 19  | ma_dist_35   | c / SMA_35 - 1                                                                | 35      |
# | 20  | stoch_k_14   | (c - min(l, 14)) / (max(h, 14) - min(l, 14)) - 0.5, 0 when the range is 0     | 14      |
# | 21  | rvol_7       | std(r, 7) * sqrt(bars_per_year)                                               | 8       |
# | 22  | rvol_35      | std(r, 35) * sqrt(bars_per_year)                                              | 36      |
#
# Each raw feature x is then normalised per symbol over a rolling window of W = norm_window bars (values appear
# once NORM_MIN_PERIODS bars are in the window): "zscore" (x - mean_W) / std_W; "robust" (x - median_W) / IQR_W;
# "minmax" 2 (x - min_W) / (max_W - min_W) - 1. A zero spread gives 0. z-score and robust values are clipped to
# [-feature_clip, feature_clip]. Everything before `warmup` is 0. Technical warm-up = 36 + NORM_MIN_PERIODS - 1.

FEATURE_NAMES = [
    "ret_1", "ret_3", "ret_7", "ret_35", "range", "body", "upper_wick", "lower_wick", "gap", "volume_ratio",
    "volume_trend", "rsi_14", "macd", "macd_signal", "macd_hist", "bb_position", "bb_width", "atr_14", "ma_dist_7",
    "ma_dist_35", "stoch_k_14", "rvol_7", "rvol_35",
]  # fmt: skip
RAW_WARMUP = 36
NORM_MIN_PERIODS = 28
NORMALIZATIONS = ("zscore", "robust", "minmax")

# | idx | name            | formula (b = benchmark close, rb = log return of b, panel = tradable symbols) | warm-up |
# |-----|-----------------|-------------------------------------------------------------------------------|---------|
# | 0   | vol_level       | std(rb, 35) * sqrt(bars_per_year) (annualised benchmark volatility)           | 36      |
# | 1   | vol_percentile  | rank of vol_level among its values over the last 700 bars, in [0, 1]          | 70      |
# | 2   | vol_of_vol      | std(log vol_7, 35) where vol_7 = std(rb, 7)                                   | 43      |
# | 3   | trend           | log(b_t / b_{t-70}) / sum(abs(rb), 70): signed efficiency ratio in [-1, 1]    | 70      |
# | 4   | momentum        | log(b_t / b_{t-70}) / (std(rb, 70) sqrt(70)): t-statistic of the 70-bar move  | 70      |
# | 5   | volume_regime   | panel mean of log(mean(v, 7) / mean(v, 70))                                   | 70      |
# | 6   | dispersion      | mean over 7 bars of the cross-sectional std of r, times sqrt(bars_per_year)   | 8       |
# | 7   | avg_correlation | average pairwise correlation over 35 bars from the variance of the panel mean | 36      |
# | 8   | breadth         | fraction of the panel with c above its SMA_35, minus 0.5                      | 35      |
# | 9   | drawdown        | b_t / max(b_{<=t}) - 1                                                        | 0       |
REGIME_NAMES = [
    "vol_level", "vol_percentile", "vol_of_vol", "trend", "momentum", "volume_regime", "dispersion",
    "avg_correlation", "breadth", "drawdown",
]  # fmt: skip
REGIME_WARMUP = 70


def feature_warmup() -> int:
    """First bar index at which every technical and regime feature is defined (earlier bars are 0)."""
    return max(RAW_WARMUP + NORM_MIN_PERIODS - 1, REGIME_WARMUP)


def _safe_div(num: np.ndarray, den: np.ndarray, fill: float = 0.0) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, fill)
    np.divide(num, den, out=out, where=np.isfinite(den) & (den != 0) & np.isfinite(num))
    return out


def _roll(a: np.ndarray, w: int, min_periods: int | None = None):
    return pd.DataFrame(a).rolling(w, min_periods=w if min_periods is None else min_periods)


def raw_technical(data: MarketData) -> np.ndarray:
    """(T, S, 23) float64 raw features (NaN where undefined), in FEATURE_NAMES order."""
    miss = ~np.isfinite(data.close)
    c = pd.DataFrame(data.close).ffill().to_numpy()  # last close; NaN before the first bar of a symbol
    o = np.where(miss, c, data.open)
    h = np.where(miss, c, data.high)
    l = np.where(miss, c, data.low)
    v = np.where(miss | ~(data.volume > 0), np.nan, data.volume)  # zero volume is no volume information
    logc = np.log(c)
    c_prev = np.vstack([np.full((1, c.shape[1]), np.nan), c[:-1]])

    def lag(a: np.ndarray, k: int) -> np.ndarray:
        out = np.full_like(a, np.nan)
        out[k:] = a[:-k]
        return out

    r = logc - lag(logc, 1)
    rng_ = h - l
    ema = lambda a, span: pd.DataFrame(a).ewm(span=span, adjust=False, min_periods=span).mean().to_numpy()  # noqa: E731
    wilder = lambda a, n: pd.DataFrame(a).ewm(alpha=1.0 / n, adjust=False, min_periods=n).mean().to_numpy()  # noqa: E731
    up, down = np.clip(np.nan_to_num(r), 0, None), np.clip(-np.nan_to_num(r), 0, None)
    up[np.isnan(r)] = np.nan
    down[np.isnan(r)] = np.nan
    avg_up, avg_down = wilder(up, 14), wilder(down, 14)
    rsi = np.where(avg_up + avg_down > 0, avg_up / (avg_up + avg_down), 0.5) * 2.0 - 1.0
    rsi[np.isnan(avg_up)] = np.nan
    macd = (ema(c, 12) - ema(c, 26)) / c
    macd_sig = pd.DataFrame(macd).ewm(span=9, adjust=False, min_periods=9).mean().to_numpy()
    sma = {n: _roll(c, n).mean().to_numpy() for n in (7, 20, 35)}
    std20 = _roll(c, 20).std(ddof=0).to_numpy()
    tr = np.fmax(rng_, np.fmax(np.abs(h - c_prev), np.abs(l - c_prev)))
    tr[np.isnan(c_prev)] = np.nan
    lo14, hi14 = _roll(l, 14).min().to_numpy(), _roll(h, 14).max().to_numpy()
    vol35 = _roll(v, 35, 18).mean().to_numpy()
    vol7 = _roll(v, 7, 4).mean().to_numpy()
    ann = np.sqrt(data.bars_per_year)
    feats = [
        r,
        logc - lag(logc, 3),
        logc - lag(logc, 7),
        logc - lag(logc, 35),
        rng_ / c,
        _safe_div(c - o, rng_),
        _safe_div(h - np.maximum(o, c), rng_),
        _safe_div(np.minimum(o, c) - l, rng_),
        np.log(o / c_prev),
        np.log(v / vol35),
        np.log(vol7 / vol35),
        rsi,
        macd,
        macd_sig,
        macd - macd_sig,
        _safe_div(c - sma[20], 2.0 * std20),
        4.0 * std20 / sma[20],
        wilder(tr, 14) / c,
        c / sma[7] - 1.0,
        c / sma[35] - 1.0,
        _safe_div(c - lo14, hi14 - lo14, fill=0.5) - 0.5,
        _roll(r, 7).std().to_numpy() * ann,
        _roll(r, 35).std().to_numpy() * ann,
    ]
    out = np.stack(feats, axis=-1)
    out[np.isnan(c)] = np.nan  # before a symbol's first bar nothing is defined
    for k in (5, 6, 7, 20):  # candle shape and stochastic are undefined where their inputs are
        out[..., k][np.isnan(h) | np.isnan(l)] = np.nan
    return out


def normalize_features(raw: np.ndarray, mode: str, window: int, clip: float) -> np.ndarray:
    """Rolling, per-symbol normalisation of (T, S, F) raw features; NaN stays NaN."""
    if mode not in NORMALIZATIONS:
        raise UserInputError(f"--data.normalization {mode!r}: use one of {NORMALIZATIONS}.")
    T, S, F = raw.shape
    roll = pd.DataFrame(raw.reshape(T, S * F)).rolling(window, min_periods=NORM_MIN_PERIODS)
    x = raw.reshape(T, S * F)
    if mode == "zscore":
        out = _safe_div(x - roll.mean().to_numpy(), roll.std(ddof=0).to_numpy())
        out = np.clip(out, -clip, clip)
    elif mode == "robust":
        q25, q50, q75 = (roll.quantile(q).to_numpy() for q in (0.25, 0.5, 0.75))
        out = np.clip(_safe_div(x - q50, q75 - q25), -clip, clip)
    else:
        lo, hi = roll.min().to_numpy(), roll.max().to_numpy()
        out = _safe_div(x - lo, hi - lo, fill=0.5) * 2.0 - 1.0
    out[np.isnan(x)] = np.nan
    return out.reshape(T, S, F)


def compute_technical(data: MarketData, normalization: str = "zscore", norm_window: int = 140, clip: float = 10.0):
    """(T, S, 23) float32 normalised technical features: finite, 0 before the warm-up and on missing bars."""
    norm = normalize_features(raw_technical(data), normalization, norm_window, clip)
    norm[: feature_warmup()] = 0.0
    norm[~data.tradable] = 0.0
    return np.nan_to_num(norm, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def compute_regime(data: MarketData) -> np.ndarray:
    """(T, 10) float32 market-regime features in REGIME_NAMES order; finite, 0 before the warm-up."""
    b = data.benchmark
    T = len(b)
    ann = np.sqrt(data.bars_per_year)
    rb = pd.Series(np.r_[np.nan, np.diff(np.log(b))])
    vol35 = rb.rolling(35).std()
    vol7 = rb.rolling(7).std()
    vol_pct = vol35.rolling(700, min_periods=35).rank(pct=True)
    vov = np.log(vol7.where(vol7 > 0)).rolling(35).std()
    move70 = np.log(pd.Series(b)).diff(70)
    trend = move70 / rb.abs().rolling(70).sum()
    momentum = move70 / (rb.rolling(70).std() * np.sqrt(70))

    miss = ~np.isfinite(data.close)
    c = pd.DataFrame(data.close).ffill()
    r = np.log(c).diff().to_numpy().copy()
    r[miss] = np.nan
    v = pd.DataFrame(np.where(miss | ~(data.volume > 0), np.nan, data.volume))
    vol_reg = np.log(v.rolling(7, min_periods=4).mean() / v.rolling(70, min_periods=35).mean()).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (e.g. the first bar) give NaN, handled below
        volume_regime = np.nanmean(vol_reg, axis=1)
        xs_std = np.nanstd(r, axis=1)
        panel = np.nanmean(r, axis=1)
        above = np.where(miss, np.nan, (c.to_numpy() > c.rolling(35).mean().to_numpy()).astype(float))
        above[np.isnan(c.rolling(35).mean().to_numpy())] = np.nan
        breadth = np.nanmean(above, axis=1) - 0.5
    dispersion = pd.Series(xs_std).rolling(7).mean() * ann
    # average pairwise correlation: var(mean r) = (sum_i var_i + rho * sum_{i != j} sd_i sd_j) / S^2
    sd_i = pd.DataFrame(r).rolling(35).std().to_numpy()
    S = r.shape[1]
    var_p = pd.Series(panel).rolling(35).var().to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sum_var = np.nansum(sd_i**2, axis=1)
        sum_sd = np.nansum(sd_i, axis=1)
    avg_corr = _safe_div(S**2 * var_p - sum_var, sum_sd**2 - sum_var) if S > 1 else np.zeros(T)
    drawdown = b / np.maximum.accumulate(b) - 1.0
    out = np.stack(
        [
            vol35 * ann,
            vol_pct,
            vov,
            trend,
            momentum,
            volume_regime,
            dispersion,
            avg_corr,
            breadth,
            drawdown,
        ],
        axis=-1,
    ).astype(np.float64)
    out[: feature_warmup()] = 0.0
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


CROSS_SECTION_NAMES = ("avg_corr_2d", "dispersion_1d", "xs_autocorr_1d")


def cross_section_features(data: MarketData) -> np.ndarray:
    """(T, 3) float32 cross-sectional features in CROSS_SECTION_NAMES order, for the master agent (mappo_master.py);
    not part of the regime block, so the observation shapes do not change. Causal (bar t uses bars <= t), finite, 0
    before feature_warmup(). r is the bar log return; a missing bar's return is missing and enters no sum; z[t, s] =
    r[t, s] / std(r[t-70 : t, s]) (at least 35 returns) standardises each symbol by what was known before the bar.
      avg_corr_2d     average pairwise correlation over the last 14 bars: sum_t sum_{i != j} z_i z_j divided by
                      sum_{i != j} sqrt(Q_i Q_j), Q_i = sum_t z_i^2 (compute_regime's identity, uncentred; in [-1, 1])
      dispersion_1d   mean over the last 7 bars of the cross-sectional std of r (2 or more symbols) divided by its
                      140-bar mean: scale-free, ~1 in a steady market
      xs_autocorr_1d  pooled lag-1 autocorrelation over the last 7 bars and all symbols: sum z[t] z[t-1] /
                      sum z[t-1]^2 over the pairs where both returns exist (+rho under momentum, -rho under reversal)
    On the edge-regime market the announcement raises avg_corr_2d and lowers dispersion_1d; xs_autocorr_1d measures
    the flip itself, a day late."""
    miss = ~np.isfinite(data.close)
    r = np.log(pd.DataFrame(data.close).ffill()).diff().to_numpy().copy()  # (T, S)
    r[miss] = np.nan
    sd = pd.DataFrame(r).rolling(70, min_periods=35).std().shift(1).to_numpy()  # (T, S) std of r[t-70 : t]
    valid = np.isfinite(r) & (sd > 0)  # (T, S); a NaN sd compares False
    z = np.where(valid, r / np.where(valid, sd, 1.0), 0.0)  # (T, S), 0 where missing: it adds nothing to the sums

    # average pairwise correlation: (sum_i z_i)^2 - sum_i z_i^2 = sum_{i != j} z_i z_j on each bar
    cross = pd.Series(z.sum(1) ** 2 - (z**2).sum(1)).rolling(14).sum().to_numpy()  # (T,)
    q = pd.DataFrame(z**2).rolling(14).sum().to_numpy()  # (T, S)
    q_sum = q.sum(1)
    pairs = np.sqrt(q).sum(1) ** 2 - q_sum  # (T,) sum_{i != j} sqrt(Q_i Q_j); rounding only when < 2 symbols
    avg_corr = _safe_div(cross, np.where(pairs > 1e-9 * q_sum, pairs, 0.0))

    # dispersion relative to its own recent level
    counts = np.isfinite(r).sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without returns (the first bar) give NaN
        xs_std = pd.Series(np.where(counts >= 2, np.nanstd(r, axis=1), np.nan))  # (T,)
    dispersion = _safe_div(xs_std.rolling(7, min_periods=4).mean().to_numpy(),
                           xs_std.rolling(140, min_periods=70).mean().to_numpy())  # fmt: skip

    # pooled lag-1 autocorrelation: the AR(1) coefficient of z fitted over the last day's bars and all symbols
    pair = np.zeros_like(valid)
    pair[1:] = valid[1:] & valid[:-1]  # (T, S) bar t and bar t-1 both have a return
    z_prev = np.vstack([np.zeros((1, z.shape[1])), z[:-1]])
    num = pd.Series(np.where(pair, z * z_prev, 0.0).sum(1)).rolling(7).sum().to_numpy()
    den = pd.Series(np.where(pair, z_prev**2, 0.0).sum(1)).rolling(7).sum().to_numpy()
    xs_autocorr = _safe_div(num, den)

    out = np.stack([avg_corr, dispersion, xs_autocorr], axis=-1)  # (T, 3)
    out[: feature_warmup()] = 0.0
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def valuation_close(data: MarketData) -> np.ndarray:
    """(T, S) close forward-filled, and back-filled before a symbol's first bar: only for marking positions."""
    return pd.DataFrame(data.close).ffill().bfill().to_numpy()


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------


def make_splits(T: int, warmup: int, train_frac: float, val_frac: float, embargo: int) -> dict[str, tuple[int, int]]:
    """Chronological [start, stop) train / val / test ranges after the warm-up, `embargo` bars apart."""
    if not (0 < train_frac < 1 and 0 < val_frac < 1 and train_frac + val_frac < 1):
        raise UserInputError(
            f"--data.train-frac {train_frac} and --data.val-frac {val_frac} must lie in (0, 1) and sum to below 1."
        )
    usable = T - warmup - 2 * embargo
    n_train, n_val = int(usable * train_frac), int(usable * val_frac)
    n_test = usable - n_train - n_val
    if min(n_train, n_val, n_test) < 1:
        raise UserInputError(
            f"{T} bars leave no room for train/val/test after a warm-up of {warmup} and two embargoes of {embargo} "
            f"bars; use more data (e.g. a longer `years` or more history in the files) or a shorter lookback."
        )
    a = warmup + n_train
    b = a + embargo + n_val
    return {"train": (warmup, a), "val": (a + embargo, b), "test": (b + embargo, T)}


def make_fold_splits(T: int, warmup: int, train_frac: float, val_frac: float, embargo: int, fold: int, folds: int,
                     window: str = "expanding") -> dict[str, tuple[int, int]]:  # fmt: skip
    """Walk-forward fold `fold` of `folds`: [start, stop) train / val / test ranges. The bars after the first
    train_frac of the post-warm-up sample are cut into `folds` consecutive test blocks that tile it (each bar is
    graded by exactly one fold); fold k's validation split is the val_frac x (post-warm-up bars) just before its test
    block and its train split everything before that from the warm-up on (expanding) or the first fold's train
    length (rolling), each `embargo` bars apart, so that no fold trains or selects on a bar it is graded on."""
    usable = T - warmup
    oos = warmup + int(usable * train_frac)
    n_val, block = int(usable * val_frac), (T - oos) // max(folds, 1)
    test_lo, test_hi = oos + fold * block, (oos + (fold + 1) * block if fold < folds - 1 else T)
    val_lo = test_lo - embargo - n_val
    train_hi = val_lo - embargo
    first_train = oos - embargo - n_val - embargo - warmup  # fold 0's train length
    train_lo = warmup if window == "expanding" else max(warmup, train_hi - first_train)
    if min(block, n_val, train_hi - train_lo) < 1:
        raise UserInputError(
            f"{T} bars leave no room for {folds} walk-forward folds after a warm-up of {warmup}: fold {fold} would "
            f"have {train_hi - train_lo} train, {n_val} validation and {block} test bars. Use more data, fewer folds "
            "(--walk-forward), or a larger 1 - --data.train-frac."
        )
    return {"train": (train_lo, train_hi), "val": (val_lo, test_lo - embargo), "test": (test_lo, test_hi)}


# ---------------------------------------------------------------------------------------------------------------
# Supervised signals
# ---------------------------------------------------------------------------------------------------------------
# Label at (t, s): log(close[t + h] / close[t]) > threshold, h = sl_horizon; it looks h bars ahead, so a training
# sample at t needs t + h < train_stop (the label never reads a bar outside the train split). Inputs are the
# observation windows technical[t - lookback + 1 : t + 1, s]. The three classifiers (encoders.SignalMLP /
# SignalLSTM / SignalGRU) are fitted on the train split only, so val and test probabilities are out of sample.

SL_MODELS = ("mlp", "lstm", "gru")


def forward_labels(close: np.ndarray, horizon: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(T, S) labels (1.0 if the forward log return beats the threshold) and their validity (both bars exist)."""
    T = close.shape[0]
    fwd = np.full(close.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        fwd[: T - horizon] = np.log(close[horizon:] / close[: T - horizon])
    valid = np.isfinite(fwd)
    return (np.nan_to_num(fwd, nan=0.0) > threshold).astype(np.float32), valid


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties get their average rank)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def f1_score(labels: np.ndarray, probs: np.ndarray, cut: float = 0.5) -> float:
    """F1 of the positive class with predictions probs > cut."""
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(probs).ravel() > cut
    tp = float((y & p).sum())
    denom = 2 * tp + float((~y & p).sum()) + float((y & ~p).sum())
    return 2 * tp / denom if denom > 0 else 0.0


def _windows(technical: np.ndarray, t: np.ndarray, s: np.ndarray, lookback: int) -> np.ndarray:
    """(N, lookback, F) float32 copies of technical[t - lookback + 1 : t + 1, s]."""
    view = np.lib.stride_tricks.sliding_window_view(technical, lookback, axis=0)  # (T - L + 1, S, F, L)
    return np.ascontiguousarray(view[t - lookback + 1, s].transpose(0, 2, 1))


def _fit_classifier(cls, technical, labels, t_idx, s_idx, cfg: DataConfig, seed: int, L: int, F: int):
    """One classifier fitted on the windows ending at bars t_idx of symbols s_idx (at most sl_max_samples of them,
    drawn with `seed`), for sl_epochs epochs of Adam on the binary cross-entropy."""
    import torch

    rng = np.random.default_rng(seed)
    if len(t_idx) > cfg.sl_max_samples:
        keep = np.sort(rng.choice(len(t_idx), cfg.sl_max_samples, replace=False))
        t_idx, s_idx = t_idx[keep], s_idx[keep]
    x = torch.from_numpy(_windows(technical, t_idx, s_idx, L))
    y = torch.from_numpy(labels[t_idx, s_idx])
    torch.manual_seed(seed)
    model = cls(L, F)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed + 100)
    model.train()
    for _ in range(cfg.sl_epochs):
        for idx in torch.randperm(len(x), generator=gen).split(256):
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _predict(model, technical, bars: np.ndarray, L: int) -> np.ndarray:
    """Probabilities (len(bars), S) of a fitted classifier for every symbol at the given bars."""
    import torch

    S = technical.shape[1]
    out = np.empty((len(bars), S), dtype=np.float32)
    chunk = max(1, 16384 // S)
    with torch.no_grad():
        for a in range(0, len(bars), chunk):
            t_idx = np.repeat(bars[a : a + chunk], S)
            s_idx = np.tile(np.arange(S), len(t_idx) // S)
            logits = model(torch.from_numpy(_windows(technical, t_idx, s_idx, L)))
            out[a : a + chunk] = torch.sigmoid(logits).numpy().reshape(-1, S)
    return out


def fit_signals(
    technical: np.ndarray, data: MarketData, splits: dict[str, tuple[int, int]], cfg: DataConfig, progress=None
) -> tuple[np.ndarray, dict]:
    """The MLP, LSTM and GRU classifiers' (T, S, 3) probabilities for every bar (0.5 before the warm-up and on missing
    bars) and their metrics {"mlp": {"train_auc", "val_auc", "val_f1", ...}, "lstm": ..., "gru": ...}.

    Validation and test bars (and every bar after the train split) get a model fitted on the whole train split. The
    train split's own bars get out-of-fold probabilities (purged k-fold, k = sl_folds): the split is cut into k
    contiguous folds, and fold j is predicted by a model fitted on the other folds, leaving out the samples within
    max(lookback, sl_horizon) bars of fold j (an embargo on both sides: no window or label of a training sample
    overlaps the fold). So train observations look like test observations, and train_auc (out of fold) is comparable
    with val_auc: with in-sample train probabilities a policy learns to trust a feature that vanishes out of sample.
    progress(message), when given, hears each fit with the time so far and an estimate of the time left.
    """
    from encoders import SignalGRU, SignalLSTM, SignalMLP

    T, S, F = technical.shape
    L, h = cfg.lookback, cfg.sl_horizon
    labels, valid = forward_labels(data.close, h, cfg.sl_threshold)
    valid &= data.tradable
    first = max(L - 1, feature_warmup())
    valid[:first] = False
    embargo = max(L, h)

    def samples(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples whose window ends in [lo, hi) and whose label bar t + h is before hi."""
        mask = np.zeros_like(valid)
        mask[lo : max(lo, hi - h)] = valid[lo : max(lo, hi - h)]
        return np.nonzero(mask)

    tr_lo, tr_hi = splits["train"]
    tr_t, tr_s = samples(tr_lo, tr_hi)
    if len(tr_t) < 64:
        raise UserInputError(
            f"Only {len(tr_t)} training windows for the signal classifiers; use more data or --data.no-sl-signals."
        )
    if cfg.sl_folds < 2:
        raise UserInputError(f"--data.sl-folds {cfg.sl_folds}: the out-of-fold train probabilities need 2 or more.")
    va_t, va_s = samples(*splits["val"])
    edges = np.linspace(max(tr_lo, first), tr_hi, cfg.sl_folds + 1).astype(int)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.sl_threads))
    probs = np.full((T, S, 3), 0.5, dtype=np.float32)
    metrics = {}
    fits, done, t0 = len(SL_MODELS) * (cfg.sl_folds + 1), 0, time.time()

    def tick(name: str) -> None:  # one fit done: say how far, and about how long is left
        nonlocal done
        done += 1
        if progress is not None:
            spent = time.time() - t0
            left = spent / done * (fits - done)
            progress(f"data: signal classifiers {done}/{fits} ({name}), {spent:.0f} s, ~{left:.0f} s left")

    try:
        for k, (name, cls) in enumerate(zip(SL_MODELS, (SignalMLP, SignalLSTM, SignalGRU), strict=True)):
            seed = cfg.seed + 97 * k
            for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):  # out-of-fold train bars
                keep = (tr_t < lo - embargo) | (tr_t >= hi + embargo)
                model = _fit_classifier(cls, technical, labels, tr_t[keep], tr_s[keep], cfg, seed + j + 1, L, F)
                probs[lo:hi, :, k] = _predict(model, technical, np.arange(lo, hi), L)
                tick(name)
            model = _fit_classifier(cls, technical, labels, tr_t, tr_s, cfg, seed, L, F)  # the whole train split
            tick(name)
            probs[tr_hi:, :, k] = _predict(model, technical, np.arange(tr_hi, T), L)
            probs[~data.tradable, k] = 0.5
            probs[:first, :, k] = 0.5
            p_val, y_val = probs[va_t, va_s, k], labels[va_t, va_s]
            metrics[name] = {
                "train_auc": roc_auc(labels[tr_t, tr_s], probs[tr_t, tr_s, k]),
                "val_auc": roc_auc(y_val, p_val),
                "val_f1": f1_score(y_val, p_val),
                "train_samples": int(len(tr_t)),
                "val_samples": int(len(y_val)),
                "val_positive_rate": float(y_val.mean()) if len(y_val) else float("nan"),
                "folds": cfg.sl_folds,
                "horizon": h,
                "threshold": cfg.sl_threshold,
            }
    finally:
        torch.set_num_threads(threads)
    return probs, metrics


# ---------------------------------------------------------------------------------------------------------------
# Cache: one folder per key = sha256(parameters, data file contents, CODE_VERSION, this module's source); parquet
# files plus meta.json with their sha256 checksums. A folder whose checksums, key or shapes do not match is rebuilt.
# ---------------------------------------------------------------------------------------------------------------
_NOT_IN_KEY = ("cache", "cache_dir", "sl_threads")


class CacheError(Exception):
    """A cache folder that cannot be trusted (missing, corrupt or stale); prepare_market rebuilds it."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(cfg: DataConfig) -> str:
    """Hash of everything the prepared arrays depend on: parameters, the data's bytes and the code."""
    params = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    parts = [CODE_VERSION, json.dumps(params, sort_keys=True), _file_sha256(Path(__file__))]
    if cfg.sl_signals:
        import encoders

        parts.append(_file_sha256(Path(encoders.__file__)))
    if cfg.source != "synthetic":
        src = Path(cfg.source)
        files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else [src] if src.exists() else []
        parts += [f"{p.name}:{_file_sha256(p)}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _panel_table(arrays: dict[str, np.ndarray]):
    import pyarrow as pa

    return pa.table({k: pa.array(np.ascontiguousarray(v).reshape(-1)) for k, v in arrays.items()})


def write_cache(p: PreparedMarket, folder: Path, key: str) -> None:
    """Write the prepared arrays atomically (a temporary folder renamed into place)."""
    import pyarrow.parquet as pq

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    d = p.data
    T, S = d.close.shape
    tables = {
        "bars": {k: getattr(d, k) for k in ("open", "high", "low", "close", "volume", "tradable")}
        | {"valuation_close": p.valuation_close},
        "series": {"timestamp": d.timestamps, "benchmark": d.benchmark}
        | ({"regime_label": d.regime_labels} if d.regime_labels is not None else {})
        | ({"edge_label": d.edge_labels} if d.edge_labels is not None else {}),
        "technical": {n: p.technical[..., i] for i, n in enumerate(p.feature_names)},
        "regime": {n: p.regime[:, i] for i, n in enumerate(p.regime_names)},
        "sl_probs": {n: p.sl_probs[..., i] for i, n in enumerate(SL_MODELS)},
    }
    checksums = {}
    for name, arrays in tables.items():
        path = tmp / f"{name}.parquet"
        pq.write_table(_panel_table(arrays), path)
        checksums[name] = _file_sha256(path)
    meta = {
        "key": key,
        "code_version": CODE_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": [T, S],
        "symbols": d.symbols,
        "benchmark_name": d.benchmark_name,
        "bars_per_day": d.bars_per_day,
        "bars_per_year": d.bars_per_year,
        "source": d.source,
        "splits": p.splits,
        "warmup": p.warmup,
        "lookback": p.lookback,
        "embargo": p.embargo,
        "sl_metrics": p.sl_metrics,
        "feature_names": p.feature_names,
        "regime_names": p.regime_names,
        "leader_map": None if d.leader_map is None else d.leader_map.tolist(),
        "checksums": checksums,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def read_cache(folder: Path, key: str) -> PreparedMarket:
    """The PreparedMarket stored in folder; CacheError if anything is missing, altered or stale."""
    import pyarrow.parquet as pq

    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"meta.json unreadable ({err})") from err
    if meta.get("key") != key or meta.get("code_version") != CODE_VERSION:
        raise CacheError("the cache was written for other data, parameters or code")
    cols = {}
    for name, digest in meta["checksums"].items():
        path = folder / f"{name}.parquet"
        if not path.exists() or _file_sha256(path) != digest:
            raise CacheError(f"{path.name} is missing or its checksum does not match (corrupt or edited)")
        try:
            table = pq.read_table(path)
            cols[name] = {k: table.column(k).to_numpy() for k in table.column_names}
        except Exception as err:  # a file with a matching checksum that pyarrow cannot read is still unusable
            raise CacheError(f"{path.name} unreadable ({err})") from err
    T, S = meta["shape"]
    try:
        bars = {k: v.reshape(T, S) for k, v in cols["bars"].items()}
        series = cols["series"]
        data = MarketData(
            timestamps=series["timestamp"].astype("datetime64[ns]"),
            symbols=meta["symbols"],
            open=bars["open"],
            high=bars["high"],
            low=bars["low"],
            close=bars["close"],
            volume=bars["volume"],
            tradable=bars["tradable"].astype(bool),
            benchmark=series["benchmark"],
            benchmark_name=meta["benchmark_name"],
            bars_per_day=meta["bars_per_day"],
            bars_per_year=meta["bars_per_year"],
            regime_labels=series.get("regime_label"),
            edge_labels=series.get("edge_label"),
            leader_map=None if meta.get("leader_map") is None else np.asarray(meta["leader_map"], dtype=np.int64),
            source=meta["source"],
        )
        stack = lambda name, n: np.stack([cols[name][k] for k in n], axis=-1)  # noqa: E731
        return PreparedMarket(
            data=data,
            technical=stack("technical", meta["feature_names"]).reshape(T, S, -1),
            regime=stack("regime", meta["regime_names"]),
            sl_probs=stack("sl_probs", SL_MODELS).reshape(T, S, 3),
            valuation_close=bars["valuation_close"],
            splits={k: tuple(v) for k, v in meta["splits"].items()},
            warmup=meta["warmup"],
            sl_metrics=meta["sl_metrics"],
            feature_names=meta["feature_names"],
            regime_names=meta["regime_names"],
            lookback=meta["lookback"],
            embargo=meta["embargo"],
        )
    except (KeyError, ValueError) as err:
        raise CacheError(f"arrays do not match the recorded shapes ({err})") from err


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def _embargo(cfg: DataConfig) -> int:
    floor = max(cfg.lookback, cfg.sl_horizon)
    if cfg.embargo is not None and cfg.embargo < floor:
        raise UserInputError(
            f"--data.embargo {cfg.embargo} is shorter than max(lookback, sl_horizon) = {floor}; raise it or leave it "
            "unset."
        )
    return floor if cfg.embargo is None else cfg.embargo


def check_data_config(cfg: DataConfig) -> None:
    """Check the data flags before any work; a UserInputError names the flag and the fix."""
    if cfg.source == "synthetic":
        if cfg.num_symbols < 1 or cfg.years <= 0:
            raise UserInputError(f"--data.num-symbols {cfg.num_symbols} and --data.years {cfg.years} must be positive.")
        check_synthetic_flags(cfg.signal_strength, cfg.gap_rate, cfg.regime_foresight, cfg.edge_regime, cfg.lead_lag)
    elif not Path(cfg.source).exists():
        raise UserInputError(
            f"--data.source {cfg.source}: no such file or folder. Pass synthetic, one bar file (CSV or parquet; the "
            "file name is the symbol), a folder of per-symbol files, or one long-format file with a symbol column."
        )
    if not (0 < cfg.train_frac < 1 and 0 < cfg.val_frac < 1 and cfg.train_frac + cfg.val_frac < 1):
        raise UserInputError(
            f"--data.train-frac {cfg.train_frac} and --data.val-frac {cfg.val_frac} must lie in (0, 1) and sum to "
            "below 1."
        )
    if cfg.lookback < 1 or cfg.sl_horizon < 1 or cfg.min_episode_bars < 1:
        raise UserInputError("--data.lookback, --data.sl-horizon and --data.min-episode-bars must be at least 1.")
    if cfg.norm_window < NORM_MIN_PERIODS or cfg.feature_clip <= 0:
        raise UserInputError(
            f"--data.norm-window {cfg.norm_window} must be at least {NORM_MIN_PERIODS} and --data.feature-clip "
            "positive."
        )
    if cfg.folds < 0 or (cfg.folds and not 0 <= cfg.fold < cfg.folds):
        raise UserInputError(f"--data.fold {cfg.fold} must lie in 0 .. --data.folds - 1 ({cfg.folds - 1}).")
    if cfg.sl_signals and cfg.sl_folds < 2:
        raise UserInputError(f"--data.sl-folds {cfg.sl_folds}: the out-of-fold train probabilities need 2 or more.")
    _embargo(cfg)


def load_market(cfg: DataConfig) -> MarketData:
    """The raw aligned bars described by cfg: the synthetic market or the user's files."""
    if cfg.source == "synthetic":
        return generate_synthetic_market(
            cfg.num_symbols,
            cfg.years,
            cfg.seed,
            cfg.signal_strength,
            cfg.gap_rate,
            regime_foresight=cfg.regime_foresight,
            edge_regime=cfg.edge_regime,
            lead_lag=cfg.lead_lag,
        )
    return load_user_market(cfg)


def build_prepared(data: MarketData, cfg: DataConfig, progress=None) -> PreparedMarket:
    """Features, splits and signals for already loaded bars (no cache). progress(message), when given, hears each
    stage and its time."""
    if cfg.lookback < 1:
        raise UserInputError(f"--data.lookback {cfg.lookback} must be at least 1.")
    say = progress or (lambda message: None)
    warmup = feature_warmup()
    embargo = _embargo(cfg)
    if cfg.folds:
        splits = make_fold_splits(len(data.timestamps), warmup, cfg.train_frac, cfg.val_frac, embargo, cfg.fold,
                                  cfg.folds, cfg.fold_window)  # fmt: skip
    else:
        splits = make_splits(len(data.timestamps), warmup, cfg.train_frac, cfg.val_frac, embargo)
    t0 = time.time()
    technical = compute_technical(data, cfg.normalization, cfg.norm_window, cfg.feature_clip)
    regime = compute_regime(data)
    T, S = data.close.shape
    say(f"data: features of {T} bars x {S} symbols in {time.time() - t0:.1f} s")
    if cfg.sl_signals:
        t0 = time.time()
        sl_probs, sl_metrics = fit_signals(technical, data, splits, cfg, progress)
        auc = ", ".join(f"{k} {m['train_auc']:.3f} / {m['val_auc']:.3f}" for k, m in sl_metrics.items())
        say(f"data: signal classifiers (train out-of-fold / validation AUC: {auc}) in {time.time() - t0:.1f} s")
    else:
        sl_probs, sl_metrics = np.full((T, S, 3), 0.5, dtype=np.float32), {}
    return PreparedMarket(
        data=data,
        technical=technical,
        regime=regime,
        sl_probs=sl_probs,
        valuation_close=valuation_close(data),
        splits=splits,
        warmup=warmup,
        sl_metrics=sl_metrics,
        feature_names=list(FEATURE_NAMES),
        regime_names=list(REGIME_NAMES),
        lookback=cfg.lookback,
        embargo=embargo,
    )


def prepare_market(cfg: DataConfig, progress=None) -> PreparedMarket:
    """The one entry point: load or generate bars, validate, compute features, splits and signals; cached.
    progress(message), when given (the scripts pass print), hears each stage and its time."""
    check_data_config(cfg)
    say = progress or (lambda message: None)
    key = cache_key(cfg) if cfg.cache else None
    folder = Path(cfg.cache_dir) / key if cfg.cache else None
    if cfg.cache and folder.exists():
        try:
            t0 = time.time()
            prepared = read_cache(folder, key)
            say(f"data: read from the cache {folder} in {time.time() - t0:.1f} s")
            return prepared
        except CacheError as err:
            warnings.warn(f"Rebuilding the market cache {folder}: {err}", stacklevel=2)
            shutil.rmtree(folder, ignore_errors=True)
    t0 = time.time()
    data = load_market(cfg)
    say(f"data: {'generated' if cfg.source == 'synthetic' else 'loaded and validated'} {len(data.timestamps)} bars x "
        f"{len(data.symbols)} symbols in {time.time() - t0:.1f} s")  # fmt: skip
    prepared = build_prepared(data, cfg, progress)
    if cfg.cache:
        write_cache(prepared, folder, key)
        say(f"data: cached in {folder}")
    return prepared


def make_synthetic_prepared(
    num_symbols: int = 4,
    years: float = 0.25,
    seed: int = 0,
    signal_strength: float = 0.1,
    gap_rate: float = 0.0,
    sl_signals: bool = False,
    cache_dir: str | None = None,
    **overrides,
) -> PreparedMarket:
    """A small, fast synthetic PreparedMarket for tests and examples. Without sl_signals, sl_probs is 0.5 (no
    classifier is fitted); nothing is written to disk unless cache_dir is given. Other DataConfig fields may be
    passed as keyword arguments (e.g. lookback=12, normalization="robust")."""
    cfg = DataConfig(
        source="synthetic",
        num_symbols=num_symbols,
        years=years,
        seed=seed,
        signal_strength=signal_strength,
        gap_rate=gap_rate,
        sl_signals=sl_signals,
        cache=cache_dir is not None,
        cache_dir=cache_dir or DataConfig.cache_dir,
        **overrides,
    )
    return prepare_market(cfg)


def random_walk_market(
    T: int = 300,
    S: int = 3,
    seed: int = 0,
    flat: bool = False,
    splits: dict | None = None,
    tradable: np.ndarray | None = None,
    volume: tuple[float, float] = (1e4, 2e4),
) -> PreparedMarket:
    """A PreparedMarket of T bars x S symbols from random (or flat) prices and random features, without the feature
    pipeline: the toy market of the tests and the environment benchmark. 7 hourly bars a day, every day; volume
    uniform in `volume`; splits default to train [30, 200), val [230, 260), test [270, T)."""
    rng = np.random.default_rng(seed)
    if flat:
        close = np.full((T, S), 100.0)
        open_ = close.copy()
    else:
        close = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.01, (T, S)), axis=0))
        open_ = close * np.exp(rng.normal(0, 0.002, (T, S)))
    i = np.arange(T)
    data = MarketData(
        timestamps=(np.datetime64("2024-01-01T14", "h") + i // 7 * 24 + i % 7).astype("datetime64[ns]"),
        symbols=[f"SYN{k:03d}" for k in range(S)],
        open=open_,
        high=np.maximum(open_, close) * 1.001,
        low=np.minimum(open_, close) * 0.999,
        close=close,
        volume=rng.uniform(*volume, (T, S)),
        tradable=np.ones((T, S), bool) if tradable is None else tradable,
        benchmark=close.mean(1),
        benchmark_name="SYNIDX",
        bars_per_day=7.0,
        bars_per_year=7.0 * 252,
    )
    return PreparedMarket(
        data=data,
        technical=rng.normal(size=(T, S, 23)).astype(np.float32),
        regime=rng.normal(size=(T, 10)).astype(np.float32),
        sl_probs=rng.uniform(size=(T, S, 3)).astype(np.float32),
        valuation_close=close.copy(),
        splits=splits or {"train": (30, 200), "val": (230, 260), "test": (270, T)},
        warmup=30,
    )
