"""Market data for the trading environment: bars (a seeded synthetic market or the user's own files), validation,
calendar alignment, causal features, supervised signals, chronological splits and the prepared-array cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
