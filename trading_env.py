"""Vectorised trading environment: execution, costs, action masks, anti-collapse, reward shaper, telemetry, and the
gymnasium / PettingZoo faces over one numpy core.

Layout of this file: constants and configs -> RewardShaper -> the records step()'s phases hand on (Decisions, Orders,
Fills, Accounts, Diversity) -> VecTradingCore (the only simulator) -> TradingEnvironment (gymnasium.Env, one symbol)
-> TradingVectorEnv (gymnasium VectorEnv over all slots) -> SB3VecEnv (Stable-Baselines3, when installed) ->
PortfolioParallelEnv (PettingZoo ParallelEnv, portfolio mode) -> rollout telemetry for the scripts. Market data and
features live in market_data.py, the backtests in backtest.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from market_data import PreparedMarket, UserInputError

# ---------------------------------------------------------------------------------------------------------------------
# Actions and directives
# ---------------------------------------------------------------------------------------------------------------------
NUM_ACTIONS = 7
HOLD, BUY_SMALL, BUY_MEDIUM, BUY_LARGE, SELL_PARTIAL, SELL_ALL, ADD = range(NUM_ACTIONS)
ACTION_NAMES = ("HOLD", "BUY_SMALL", "BUY_MEDIUM", "BUY_LARGE", "SELL_PARTIAL", "SELL_ALL", "ADD")
INCREASE_ACTIONS = [1, 2, 3, 6]  # BUY_SMALL, BUY_MEDIUM, BUY_LARGE, ADD: the actions that add exposure
BUY_SIZES = np.array([0.025, 0.06, 0.09])  # BUY_SMALL/MEDIUM/LARGE notional as a fraction of equity
ADD_SIZE = 0.03  # ADD notional as a fraction of equity
SELL_PARTIAL_FRACTION = 0.5  # SELL_PARTIAL sells this fraction of the shares held

# Master directives: the DIRECTIVE_SHAPE grid, risk (5) x concentration level (4) x regime (3), row-major: index =
# (risk * 4 + level) * 3 + regime (encoders.py's DIRECTIVE_SHAPE is the same grid; a test keeps them equal).
# The per-position cap and the open-position limit move together as one "concentration level": a tight cap with many
# positions (diversified) up to a loose cap with few positions (concentrated). The limit is a fraction of S, rounded up.
# Risk 0 ("flat", beyond DESIGN's four levels) masks every BUY_* and ADD: the book can only hold or sell, so a master
# can take the book to cash on days its symbol agents lose (without it the least-exposure directive held one
# position of up to 25%, and de-risking traded diversification for exposure; docs/environment.md).
RISK_MULTIPLIERS = (0.0, 0.5, 0.75, 1.0, 1.25)
POSITION_CAPS = (0.05, 0.10, 0.15, 0.25)
OPEN_LIMIT_FRACTIONS = (1.0, 0.5, 0.25, 0.1)
REGIME_MODES = ("defensive", "neutral", "aggressive")
REGIME_MAX_EXPOSURE = (0.5, 0.75, 0.9)
DIRECTIVE_SHAPE = (5, 4, 3)  # (len(RISK_MULTIPLIERS), len(POSITION_CAPS), len(REGIME_MODES))
NUM_DIRECTIVES = int(np.prod(DIRECTIVE_SHAPE))  # 60
NEUTRAL_DIRECTIVE = int(np.ravel_multi_index((RISK_MULTIPLIERS.index(1.0), 1, 1), DIRECTIVE_SHAPE))  # 40: risk 1.0,
# cap 10% / limit 50% of S, neutral regime

OBS_KEYS = ("technical", "sl_probs", "position", "portfolio", "regime", "action_mask")
REWARD_COMPONENTS = (
    "pnl",
    "cost",
    "timing",
    "sharpe",
    "drawdown",
    "utilisation",
    "diversification",
    "diversity_bonus",
    "repeat_penalty",
    "intrinsic",
)
POSITION_FEATURES = ("entry_over_close_minus_1", "size_fraction", "unrealised_pnl", "hold_time", "side")
PORTFOLIO_FEATURES = (
    "equity_over_initial",
    "exposure",
    "rolling_sharpe",
    "rolling_sortino",
    "realised_pnl_over_initial",
    "cash_fraction",
    "drawdown",
    "open_positions",
)
DIRECTIVE_FEATURES = ("risk_multiplier", "position_cap", "open_limit_fraction", "regime_mode")
HOLD_TIME_SCALE = 100.0  # position obs: hold time in bars / 100
OBS_CLIP = (
    10.0  # position, portfolio and regime observations are clipped to +-OBS_CLIP (technical: --data.feature-clip)
)
RISK_STD_FLOOR = 1e-8  # per-bar return spread below which the rolling Sharpe / Sortino divide by this floor instead
RISK_RATIO_CLIP = 5.0  # rolling per-bar Sharpe / Sortino clip (a per-bar Sharpe of 5 is already absurd)
EPISODE_COUNTERS = (
    "length", "reward", "cost", "turnover", "trades", "violations", "masked_attempts", "forced_holds",
    "voluntary_trades", "policy_trades", "diversity_bonus", "order_cancelled", "order_shrunk", "round_trips",
    "winning_trips", "liquidations",
)  # fmt: skip


def directive_values(index) -> np.ndarray:
    """Directive index (...) in [0, 60) -> (..., 4) float: risk multiplier, position cap, open-limit fraction, regime
    mode (-1 defensive, 0 neutral, 1 aggressive)."""
    index = np.asarray(index)
    r, lvl, reg = np.unravel_index(index, DIRECTIVE_SHAPE)
    return np.stack(
        [
            np.take(RISK_MULTIPLIERS, r),
            np.take(POSITION_CAPS, lvl),
            np.take(OPEN_LIMIT_FRACTIONS, lvl),
            reg.astype(np.float64) - 1.0,
        ],
        axis=-1,
    )


def entropy_of_counts(counts: np.ndarray) -> np.ndarray:
    """Entropy in nats of action counts (..., 7) -> (...); 0 where there are no counts."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(-1)


def slot_action_entropy(actions: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """(T, E, S) actions -> (E, S) entropy of each slot's empirical action distribution over T: in nats, or, given the
    (T, E, S, 7) masks, normalised by log(number of actions allowed to that slot at some step of the T), the units of
    the entropy control (NaN for a slot that never had a choice)."""
    h = entropy_of_counts((actions[..., None] == np.arange(NUM_ACTIONS)).sum(0))
    if masks is None:
        return h
    n = (masks != 0).any(0).sum(-1)  # (E, S)
    return np.divide(h, np.log(np.maximum(n, 2)), out=np.full(h.shape, np.nan), where=n > 1)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RewardConfig:
    """Weights and units of the reward components. The weights are the seed's Stage-5 preset; every component is in
    one currency, pnl units of `pnl_scale` x the account's initial capital, and bounded (docs/reward.md)."""

    pnl_weight: float = 0.75
    """weight of the PnL component (the equity change, with the ROI scaling of realised trades)"""
    cost_weight: float = 0.10
    """weight of the transaction-cost penalty (costs are also inside the PnL: this is extra friction against churn)"""
    timing_weight: float = 0.0
    """weight of the entry/exit timing component (fill price against the 24-bar mean close seen at the decision)"""
    sharpe_weight: float = 0.03
    """weight of the rolling Sharpe component (paid on the holdings, so a flat account earns nothing)"""
    drawdown_weight: float = 0.02
    """weight of the drawdown penalty (charged on the holdings while the account is below its peak)"""
    utilisation_weight: float = 0.0
    """weight of the capital-utilisation penalty"""
    diversification_weight: float = 0.0
    """weight of the diversification component (1 - Herfindahl of the account's positions, paid on the holdings)"""
    diversity_bonus_weight: float = 0.07
    """weight of the action-diversity bonus (anti-collapse; classes hold / increase / decrease, paid on the holdings)"""
    repeat_penalty_weight: float = 0.05
    """weight of the action-repeat penalty (anti-collapse)"""
    intrinsic_weight: float = 0.01
    """weight of the intrinsic reward for a voluntary fill of at least the minimum notional"""
    pnl_mode: Literal["mark_to_market", "realized"] = "mark_to_market"
    """mark_to_market: the equity change every bar; realized: PnL booked only when shares are sold"""
    pnl_scale: float = 0.001
    """one reward unit is this fraction of the account's initial capital (0.001 = 0.1%, $100 on $100k)"""
    shaping_bps: float = 1.0
    """a shaping score of 1 is worth this many basis points of its base per bar: the holdings for the bonuses, that
is sharpe, drawdown, diversification, diversity and intrinsic (a flat account earns none of them), and the capital
for the pure penalties, utilisation and repeat"""
    roi_scaling: bool = True
    """scale a trade's realised PnL, when the position is reduced, by clip(1 + roi_scale_factor * |roi|, *roi_clip)"""
    roi_scale_factor: float = 2.0
    """ROI scaling factor (a trade with 10% ROI counts 1.2x, in either direction)"""
    roi_clip: tuple[float, float] = (0.5, 3.0)
    """bounds of the ROI multiplier"""
    drawdown_scale: float = 0.10
    """drawdown score = drawdown / drawdown_scale, at most 3 (a 10% drawdown scores 1)"""
    utilisation_target: float = 0.5
    """utilisation score = -|exposure - target| / target"""
    timing_clip: float = 0.01
    """the timing component's price improvement is clipped to +-this fraction of the fill's notional"""
    sharpe_clip: float = 1.0
    """the rolling per-bar Sharpe score is clipped to +-this"""
    diversity_min_samples: int = 10
    """the diversity bonus is 0 until the window holds this many steps"""

    def weights(self) -> np.ndarray:
        """The weights in the order of REWARD_COMPONENTS."""
        return np.array([getattr(self, f"{name}_weight") for name in REWARD_COMPONENTS], dtype=np.float32)


@dataclass
class EnvConfig:
    """Trading environment settings (nested into the scripts' tyro Args as `env`)."""

    initial_capital: float = 100_000.0
    """starting cash of every account (a slot in independent mode, an env in portfolio mode)"""
    commission_bps: float = 7.5
    """commission per side in basis points of the traded notional (15 bps round trip)"""
    spread_bps: float = 1.0
    """fixed part of the slippage per side in basis points (half the quoted spread)"""
    impact_coef: float = 1.0
    """square-root impact: slippage += impact_coef * vol * sqrt(order notional / dollar volume of the decision bar)"""
    max_slippage_bps: float = 500.0
    """slippage is capped at this many basis points per side, so a fill price stays positive"""
    max_participation: float = 0.1
    """an order is at most this fraction of the decision bar's dollar volume; larger orders shrink (counted)"""
    volume_free_cost_bps: float | None = None
    """symbols whose data has no volume (FX, indices) trade only with this flat slippage per side, in basis points,
and no participation cap; without it such symbols are an error"""
    min_notional: float = 0.01
    """smallest order as a fraction of the initial capital: smaller buys are cancelled, and a sell that would leave
a smaller position sells all of it"""
    fill: Literal["open", "close"] = "open"
    """open: an order decided on bar t fills at open[t+1]; close: at close[t+1] (the order waits one full bar;
filling at close[t] would need the close before it is printed)"""
    episode_length: int = 441
    """decision steps per training episode (441 hourly bars = one quarter); sequential mode runs to the split end"""
    position_cap: float = 0.20
    """largest position as a fraction of equity in independent mode (ADD is masked at the cap; orders shrink to it)"""
    max_exposure: float = 0.9
    """BUY and ADD are masked when holdings / equity reach this (independent mode; portfolio mode: the regime)"""
    cash_buffer: float = 0.01
    """a BUY/ADD is masked unless cash covers notional * (1 + commission + cash_buffer)"""
    max_consecutive: int = 3
    """more identical consecutive non-HOLD policy actions than this: the executed action becomes HOLD"""
    diversity_window: int = 50
    """window (steps) of executed action classes for the diversity bonus"""
    risk_window: int = 50
    """window (bars) of account returns for the rolling Sharpe / Sortino in the observation and reward"""
    risk_min_count: int = 10
    """the rolling Sharpe / Sortino are 0 until the window holds this many returns"""
    anti_collapse: bool = True
    """enable the repetition limiter, the diversity bonus and the repeat penalty"""
    ruin_fraction: float = 0.5
    """an account whose equity falls below this fraction of its initial capital is stopped out"""
    max_drawdown: float = 0.3
    """an account whose drawdown from its episode peak reaches this is stopped out (a breached risk limit)"""
    symbol_regime: bool = True
    """the symbol agents observe the market-regime block (obs["regime"]); off: that block is zeros, so reading the
cross-section is left to the master (mappo_master.py reads the regime from the market itself)"""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """reward weights and units"""


# ---------------------------------------------------------------------------------------------------------------------
# Reward shaper
# ---------------------------------------------------------------------------------------------------------------------
class RewardShaper:
    """All reward components for all slots at once; reward = sum_i weight_i * component_i.

    One currency: every component is money in units of u = pnl_scale * C (C the account's initial capital), and
    bounded. Shaping scores are turned into money at `shaping_bps` basis points per bar of a base: the slot's
    holdings H for the bonuses, so that a flat account earns nothing from them, and the capital for the penalties.

    | component | per slot and step (money / u) |
    |---|---|
    | pnl | mark_to_market: the slot's equity change (holdings' value change + cash flows, costs included); realized: the PnL booked on shares sold, net of all their costs. Plus, when shares are sold, (m - 1) x R with R that sale's realised PnL and m = clip(1 + 2 \\|R / B\\|, 0.5, 3), B their cost basis (ROI scaling: symmetric in R, so a trade without edge gains nothing from it on average) |
    | cost | -(commission + slippage paid) |
    | timing | fill notional x clip(price improvement against the 24-bar mean close at the decision, +-1%) |
    | sharpe | clip(rolling per-bar Sharpe of the account, +-1) x bp x H (0 until risk_min_count returns) |
    | drawdown | -min(drawdown / 10%, 3) x bp x H |
    | utilisation | -\\|exposure - 0.5\\| / 0.5 x bp x C / K |
    | diversification | (1 - Herfindahl of the account's positions) x bp x H (0 when flat or with one symbol) |
    | diversity_bonus | tier x bp x H; tier by the action classes (hold, increase, decrease) filled in the last 50 steps: 3 -> 0.3, 2 -> 0.2, 1 -> 0 (0 before 10 steps) |
    | repeat_penalty | -min(n - 1, k) / k x bp x C / K for the n-th identical consecutive non-HOLD policy action, k = max_consecutive |
    | intrinsic | bp x the notional of a voluntary fill (the policy's own order, executed, at least min_notional) |

    bp = shaping_bps / 1e4 per bar, K = slots per account (1 in independent mode, S in portfolio mode). Costs enter
    twice on purpose in mark-to-market mode: once inside the PnL (money really lost), once as the cost penalty.
    """  # noqa: E501

    TIERS = np.array([0.0, 0.0, 0.2, 0.3], dtype=np.float32)  # bonus by the number of classes in the window (0-3)

    def __init__(self, config: RewardConfig, anti_collapse: bool = True):
        if config.pnl_mode not in ("mark_to_market", "realized"):
            raise ValueError(f"RewardConfig.pnl_mode={config.pnl_mode!r}: use 'mark_to_market' or 'realized'.")
        if config.pnl_scale <= 0 or config.shaping_bps < 0:
            raise ValueError("RewardConfig: pnl_scale must be positive and shaping_bps non-negative.")
        self.config = config
        self.anti_collapse = anti_collapse
        self.weights = config.weights()  # (10,)
        self._weights_row = self.weights[None, :]  # (1, 10)
        self.realized = config.pnl_mode == "realized"

    def diversity_tier(self, classes: np.ndarray, filled: np.ndarray) -> np.ndarray:
        """Tier score (E, S) from the number of action classes in the window and the window's fill count."""
        tier = self.TIERS[classes]
        tier[filled < self.config.diversity_min_samples] = 0.0
        return tier

    def compute(self, out: np.ndarray, *, pnl, realized, sold_basis, cost, timing, sharpe, drawdown, exposure,
                diversification, tier, run, intrinsic_notional, holdings, capital, slots, max_consecutive):  # fmt: skip
        """Fill out (10, E, S) float32 with the components and return the weighted reward (E, S) float32.

        Inputs are (E, S) arrays in money (account-level scores already broadcast to slots): pnl (the slot's equity
        change), realized (PnL booked on this step's sales), sold_basis (their cost basis), cost, timing (price
        improvement x notional), holdings (the slot's position value), intrinsic_notional; scores: sharpe (rolling,
        per bar), drawdown, exposure, diversification (1 - HHI), tier (diversity), run (repeat count)."""
        c = self.config
        unit = c.pnl_scale * capital
        bp_h = holdings * (c.shaping_bps / 1e4 / unit)  # (E, S) a score of 1 on the holdings, in units
        bp_c = c.shaping_bps / 1e4 * capital / slots / unit  # scalar: a score of 1 on the capital, in units
        base = realized if self.realized else pnl
        if c.roi_scaling:  # (m - 1) R on sales: m = clip(1 + f |roi|, lo, hi), odd in R (no reward for variance)
            roi = np.divide(realized, sold_basis, out=np.zeros(np.shape(realized)), where=sold_basis > 0)
            mult = np.minimum(np.maximum(1.0 + c.roi_scale_factor * np.abs(roi), c.roi_clip[0]), c.roi_clip[1])
            base = base + (mult - 1.0) * realized
        np.multiply(base, 1.0 / unit, out=out[0], casting="unsafe")
        np.multiply(cost, -1.0 / unit, out=out[1], casting="unsafe")
        np.multiply(timing, 1.0 / unit, out=out[2], casting="unsafe")
        np.multiply(np.clip(sharpe, -c.sharpe_clip, c.sharpe_clip), bp_h, out=out[3], casting="unsafe")
        np.multiply(np.minimum(drawdown / c.drawdown_scale, 3.0), -bp_h, out=out[4], casting="unsafe")
        util = np.abs(exposure - c.utilisation_target) / c.utilisation_target
        np.multiply(util, -bp_c, out=out[5], casting="unsafe")
        np.multiply(diversification, bp_h, out=out[6], casting="unsafe")
        if self.anti_collapse:
            np.multiply(tier, bp_h, out=out[7], casting="unsafe")
            repeats = np.minimum(np.maximum(run - 1, 0), max_consecutive)  # (E, S) repeats beyond the first, capped
            np.multiply(repeats, -bp_c / max_consecutive, out=out[8], casting="unsafe")
        else:
            out[7:9] = 0.0
        np.multiply(intrinsic_notional, c.shaping_bps / 1e4 / unit, out=out[9], casting="unsafe")
        # np.tensordot(self.weights, out, axes=1) without its Python overhead: the same (1, 10) @ (10, E * S) dot
        return np.dot(self._weights_row, out.reshape(out.shape[0], -1)).reshape(out.shape[1:])


# ---------------------------------------------------------------------------------------------------------------------
# The vectorised core
# ---------------------------------------------------------------------------------------------------------------------
def _rolling_mean_std(x: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Causal rolling mean and std over the last `window` rows (fewer at the start) of x (T, S) via cumulative sums."""
    T = x.shape[0]
    c1 = np.cumsum(x, axis=0)
    c2 = np.cumsum(x * x, axis=0)
    lag = np.zeros_like(c1)
    lag2 = np.zeros_like(c2)
    lag[window:] = c1[:-window]
    lag2[window:] = c2[:-window]
    n = np.minimum(np.arange(1, T + 1), window)[:, None]
    mean = (c1 - lag) / n
    var = np.maximum((c2 - lag2) / n - mean * mean, 0.0)
    return mean, np.sqrt(var)


# The records that step()'s phases hand on (named tuples: fixed fields, each with its shape and meaning). E envs,
# S symbols, A accounts per env (S in independent mode, 1 in portfolio mode); money in the account's currency.
class Decisions(NamedTuple):
    """_sanitise: what each slot's policy chose and what the slot executes."""

    policy: np.ndarray  # (E, S) int64 the policy's action
    executed: np.ndarray  # (E, S) int64 the executed action: HOLD where limited or masked, SELL_ALL where liquidated
    nonhold: np.ndarray  # (E, S) bool the policy chose something other than HOLD
    run: np.ndarray  # (E, S) int64 identical consecutive non-HOLD policy actions up to this one (0: no anti-collapse)
    violation: np.ndarray  # (E, S) bool the repetition limiter turned the action into HOLD
    masked: np.ndarray  # (E, S) bool the policy's action was masked (executed as HOLD)
    forced: np.ndarray  # (E, S) bool a non-HOLD policy action executed as HOLD (limiter or mask)
    liquidation: np.ndarray  # (E, S) bool a halted account's position, sold whatever the policy chose


class Orders(NamedTuple):
    """_size_orders: each slot's order sized at the decision bar t, after the caps, the participation limit, the
    account's cash and the exposure ceiling; not yet priced."""

    buy_notional: np.ndarray  # (E, S) money to spend on shares, commission excluded (0: no buy)
    sell_shares: np.ndarray  # (E, S) shares to sell (0: no sell)
    sell_notional: np.ndarray  # (E, S) sell_shares x bar_price, before slippage and commission
    bar_price: np.ndarray  # (E, S) the fill bar's open (or close) before slippage; 1.0 where the fill is cancelled
    cancelled: np.ndarray  # (E, S) bool untradable fill bar, open-position limit or a buy below min_notional
    shrunk: np.ndarray  # (E, S) bool smaller than asked (cancelled orders included)


class Fills(NamedTuple):
    """_price_fills, then _delist adds the delisting sales: the fills at bar t+1 and their costs."""

    cancelled: np.ndarray  # (E, S) bool the order was cancelled
    shrunk: np.ndarray  # (E, S) bool the order filled smaller than asked (never a cancelled one)
    buy_notional: np.ndarray  # (E, S) money spent on shares at the slipped price, commission excluded
    buy_cash: np.ndarray  # (E, S) cash the buy takes: buy_notional x (1 + commission)
    bought: np.ndarray  # (E, S) shares bought this bar
    sell_shares: np.ndarray  # (E, S) shares sold this bar, delisting sales included
    bar_price: np.ndarray  # (E, S) the fill bar's price before slippage (turnover is counted at it)
    proceeds: np.ndarray  # (E, S) cash the sales bring, net of slippage and commission
    cash_after: np.ndarray  # (E, A) the account's cash after every fill
    buying: np.ndarray  # (E, S) bool shares were bought
    selling: np.ndarray  # (E, S) bool shares were sold
    traded: np.ndarray  # (E, S) bool buying | selling
    cost: np.ndarray  # (E, S) commission plus slippage paid, in money
    realized: np.ndarray  # (E, S) PnL booked on the shares sold, net of all their costs
    sold_basis: np.ndarray  # (E, S) cost basis of the shares sold
    timing: np.ndarray  # (E, S) clipped price improvement against the 24-bar mean close x the fill's notional
    fill_price: np.ndarray  # (E, S) price per share with slippage (0 where nothing traded)
    voluntary: np.ndarray  # (E, S) bool the policy's own order, executed as chosen and filled (no liquidation)


class Accounts(NamedTuple):
    """_update_accounts: what the fills and the new bar's marks did to the accounts (the state itself is updated)."""

    t1: np.ndarray  # (E,) int64 the new bar of each env (the decision bar + 1)
    bar_return: np.ndarray  # (E, A) the account's return over the bar: equity / previous equity - 1
    downside_sq: np.ndarray  # (E, A) min(bar_return, 0) ** 2, for the Sortino
    drawdown: np.ndarray  # (E, A) 1 - equity / the episode's peak equity
    slot_pnl: np.ndarray  # (E, S) the slot's equity change: its holdings' value change plus its cash flows
    exposure: np.ndarray  # (E, A) 1 - cash / equity
    closed: np.ndarray  # (E, S) bool a round trip ended: the slot is flat after holding or buying
    won: np.ndarray  # (E, S) bool a round trip ended with a positive realised PnL
    delisted: np.ndarray  # (E, S) bool the symbol's last bar: the position was sold at its last close


class Diversity(NamedTuple):
    """_update_diversity: the anti-collapse window of executed action classes after this step's fills."""

    classes: np.ndarray  # (E, S) int64 distinct classes (hold, increase, decrease) filled in the window, 0-3
    tier: np.ndarray  # (E, S) float32 the diversity tier score (RewardShaper.TIERS; 0 before min samples)


class VecTradingCore:
    """E envs x S symbols of long-only trading as numpy arrays: one simulator behind every face of this module.

    ### Description
    Each env walks through the bars of one data split with its own clock; every (env, symbol) pair is a *slot* with
    a policy choosing one of 7 actions per bar. In **independent** mode every slot trades its own account (initial
    capital C, one symbol): symbol-agent training. In **portfolio** mode the S slots of an env share one account and
    obey the master's directives (`set_directives`): MAPPO. An order decided on bar t fills at the open of bar t+1
    (`fill="close"`: at the close of bar t+1), positions are marked at `valuation_close`, and the returned
    observation belongs to bar t+1. A value at bar t never uses bars after t.

    ### Observation Space (dict of arrays with leading axes (E, S); float32 unless stated)
    | key | shape | content |
    |---|---|---|
    | technical | (24, 23) | market.technical[t-23 : t+1] |
    | sl_probs | (3,) | market.sl_probs[t] |
    | position | (5,) | entry price / close - 1, position value / equity, close / entry - 1, hold bars / 100, side |
    | portfolio | (8,) | equity / C, exposure, rolling Sharpe, rolling Sortino (per bar, last 50 bars), realised PnL / C, cash / equity, drawdown, open positions / slots in the account |
    | regime | (10,) | market.regime[t] |
    | action_mask | (7,) int8 | 1 = allowed (rules below); HOLD is always allowed |
    | directives | (4,) | portfolio mode only: risk multiplier, position cap, open-limit fraction, regime (-1, 0, 1) |
    The entry price is the average cost per share including commissions and slippage; 0 while flat.

    ### Action Space: Discrete(7) per slot
    | action | order (notional at the decision bar's valuation close) |
    |---|---|
    | 0 HOLD | nothing |
    | 1 BUY_SMALL / 2 BUY_MEDIUM / 3 BUY_LARGE | buy 2.5% / 6% / 9% of account equity x risk multiplier |
    | 4 SELL_PARTIAL | sell 50% of the shares |
    | 5 SELL_ALL | sell every share |
    | 6 ADD | buy 3% of equity x risk multiplier more (pyramiding), shrunk to the room under the position cap |

    Mask (1 = allowed): non-tradable decision bar (halt, missing bar, zero volume) -> HOLD only; flat -> no SELL/ADD;
    holding -> no BUY_* (pyramid only by ADD); exposure >= the ceiling, or cash < notional * (1 + commission +
    cash_buffer) -> no BUY/ADD for that size; position >= cap -> no ADD; a BUY larger than the cap -> masked;
    portfolio mode: open positions >= limit -> no BUY_*, defensive regime -> no BUY_LARGE and no ADD, risk 0 -> no
    BUY_* and no ADD.
    A masked action, or a repetition-limit violation, is *executed* as HOLD and counted; the env never raises for
    it (policies are expected to use the mask, random agents are not).

    Directives (portfolio mode; index = (risk * 4 + level) * 3 + regime):
    | directive | values by index | effect |
    |---|---|---|
    | risk multiplier | 0 (flat), 0.5, 0.75, 1.0, 1.25 | multiplies BUY_* and ADD notional (and their cash checks); 0 masks them |
    | concentration level: position cap | 5%, 10%, 15%, 25% of equity | ADD masked at the cap, ADD shrunk to it, a BUY larger than the cap masked |
    | concentration level: open-position limit | ceil(1.0 / 0.5 / 0.25 / 0.1 x S) | BUY_* masked at the limit; same-step new buys beyond it cancelled in symbol order |
    | regime mode | defensive, neutral, aggressive | exposure ceiling 50% / 75% / 90%; defensive also masks BUY_LARGE and ADD |
    Independent mode behaves as risk 1.0, cap `position_cap`, no open-position limit, ceiling `max_exposure`.

    ### Execution and costs
    Fill price p = open[t+1] (or close[t+1]). Slippage fraction s = min(spread_bps / 1e4 + impact_coef * vol_t *
    sqrt(N / DV_t), max_slippage_bps / 1e4), N the order notional, DV_t = volume_t * close_t the decision bar's dollar
    volume, vol_t the std of the last 24 log returns of valuation_close (square-root impact law); a symbol without
    volume data pays the flat `volume_free_cost_bps` instead. Buys fill at p (1 + s), sells at p (1 - s);
    commission = commission_bps / 1e4 of the filled notional, both sides. Shares are fractional. Orders shrink,
    never silently (`order_shrunk`), to max_participation x DV_t, to the cash available after the same step's
    sells (net of their slippage and commission), to the exposure ceiling and to the position cap. An order is
    cancelled (`order_cancelled`) when its fill bar is not tradable (halt, missing bar, zero volume) or when a buy
    would fill below `min_notional` x C; a sell that would leave less than `min_notional` x C sells everything.
    After a symbol's last bar (delisting) its position is sold at that bar's close with the same costs. Cash never
    goes negative; equity = cash + sum(shares * valuation_close) at every step.

    ### Reward
    reward = sum of weighted components (RewardShaper): with the defaults 0.75 pnl + 0.10 cost + 0.03 sharpe +
    0.02 drawdown + 0.07 diversity_bonus + 0.05 repeat_penalty + 0.01 intrinsic, every component in units of 0.1% of
    initial capital; shaping scores are paid at 1 bp a bar of the holdings (bonuses) or of the capital (penalties).
    In portfolio mode a slot's PnL is its own symbol's contribution (the slots of an account sum to the account's
    equity change); the account-level scores (sharpe, drawdown, utilisation, diversification) are the same for every
    slot of the account.

    ### Starting State
    Cash C, no positions, clean anti-collapse windows. Training (`sequential=False`): each env starts at a bar drawn
    uniformly from the split so that `episode_length` steps fit (the whole split if it is shorter). Evaluation
    (`sequential=True`): every env starts at the first bar of the split with a full lookback window and runs to
    the split's last bar, then starts there again.

    ### Episode End
    Truncation (all slots of an env together): the clock reaches the episode's last bar (start + episode_length,
    or the split's last bar). Nothing is decided on the last bar: its observation is the final one, so no order
    ever needs a bar beyond the split. Stop-out (one account): when equity < ruin_fraction * C (ruin) or the
    drawdown from the episode peak >= max_drawdown (risk limit), the account is stopped: its mask allows HOLD only
    and every position is sold at the next fill, with costs, like any order (`liquidation`). The step at which it
    is flat again is its termination. Training: a terminated account then restarts with fresh capital at the same
    clock (in independent mode alone, in portfolio mode with all slots of its env). Evaluation (`sequential=True`):
    it stays flat with the cash it has, HOLD only, until the episode's end: no fresh capital, and every bar of the
    split is stepped exactly once. terminated and truncated are never both True: a terminated slot reports
    truncated=False.

    ### Arguments
    market (PreparedMarket), num_envs, split ("train" | "val" | "test"), mode ("independent" | "portfolio"),
    config (EnvConfig), seed, sequential (evaluation sweep), symbols (names or indices of a subset, default all).

    ### Autoreset (same step)
    Where terminated | truncated, the returned observation already belongs to the new episode (or the restarted
    account) and info["final_obs"] holds the last observation of the ended one (valid only where
    info["done_mask"]); info["episode"] holds the ended episodes' statistics, valid where info["episode"]
    ["done_mask"]. Returned arrays (obs, reward, flags, info arrays, final_obs) are preallocated buffers that the
    next call overwrites: copy what you keep.
    """  # noqa: E501

    def __init__(
        self,
        market: PreparedMarket,
        num_envs: int,
        split: str = "train",
        mode: str = "independent",
        config: EnvConfig | None = None,
        seed: int = 0,
        sequential: bool = False,
        symbols=None,
    ):
        config = config if config is not None else EnvConfig()
        self.config = config
        self._check_arguments(market, num_envs, split, mode, config)
        data = market.data
        sym_idx = self._symbol_indices(data.symbols, symbols)
        self.symbols = [data.symbols[i] for i in sym_idx]
        self.mode = mode
        self.split = split
        self.sequential = sequential
        self.num_envs = E = int(num_envs)
        self.num_symbols = S = len(sym_idx)
        self.accounts_per_env, self.symbols_per_account = (S, 1) if mode == "independent" else (1, S)
        self.bars_per_year = float(data.bars_per_year)
        self.capital = float(config.initial_capital)
        self.commission = config.commission_bps / 1e4
        self.min_notional = config.min_notional * self.capital
        L = self.lookback = int(market.lookback)
        self.shaper = RewardShaper(config.reward, config.anti_collapse)
        self._load_trading_arrays(market, sym_idx)
        self._load_observation_arrays(market, sym_idx)
        lo, hi = market.splits[split]
        self.split_start = max(int(lo), L - 1)
        self.split_last = int(hi) - 1  # last bar of the split (inclusive)
        if self.split_last - self.split_start < 1:
            raise ValueError(f"Split {split!r} = [{lo}, {hi}) leaves fewer than 2 bars after the lookback {L}.")
        self._allocate_observations()
        self._allocate_directives()
        self._rng = np.random.default_rng(seed)
        self._components = np.zeros((len(REWARD_COMPONENTS), E, S), dtype=np.float32)  # (10, E, S) the last step's
        self._allocate_state()
        self._ready = False
        self._no_episode = {k: np.zeros_like(v) for k, v in self._episode_stats(np.zeros((E, S), bool)).items()}
        if mode == "portfolio":
            self.set_directives(np.full(E, NEUTRAL_DIRECTIVE))

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _check_arguments(market: PreparedMarket, num_envs: int, split: str, mode: str, config: EnvConfig) -> None:
        if mode not in ("independent", "portfolio"):
            raise ValueError(f"mode={mode!r} is not a core mode: use 'independent' or 'portfolio'.")
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs} must be at least 1.")
        if split not in market.splits:
            raise ValueError(f"split={split!r} is not in the market's splits {sorted(market.splits)}.")
        if config.fill not in ("open", "close"):
            raise ValueError(f"EnvConfig.fill={config.fill!r}: use 'open' (next open) or 'close' (next close).")
        if config.max_consecutive < 1 or config.diversity_window < 1 or config.risk_window < 2:
            raise ValueError("EnvConfig: max_consecutive and diversity_window must be >= 1 and risk_window >= 2.")
        if not 0 < config.max_participation <= 1 or config.max_slippage_bps <= 0 or config.min_notional < 0:
            raise UserInputError(
                "EnvConfig: max_participation must lie in (0, 1], max_slippage_bps be positive and min_notional "
                "non-negative."
            )

    def _load_trading_arrays(self, market: PreparedMarket, sym_idx: np.ndarray) -> None:
        """The price, tradability and cost tables of the chosen symbols, (T, S) float64 unless stated, C-contiguous
        (a row gather on a column-major array is ~200x slower): valuation close, fill price and whether the fill bar
        trades, whether a decision bar trades and its dollar volume, the flat cost of volume-free symbols, delisting
        bars, the 24-bar volatility of log returns (for the impact) and the 24-bar mean close (for the timing)."""
        config, data, L = self.config, market.data, self.lookback
        if market.technical.shape[0] < L:
            raise ValueError(f"The market has {market.technical.shape[0]} bars, fewer than the lookback {L}.")
        T = self.T = market.technical.shape[0]
        valuation_close = np.ascontiguousarray(market.valuation_close[:, sym_idx], dtype=np.float64)
        if not np.isfinite(valuation_close).all() or (valuation_close <= 0).any():
            raise ValueError("market.valuation_close must be finite and positive everywhere (forward/back-fill it).")
        self._valuation_close = valuation_close
        tradable = np.asarray(data.tradable[:, sym_idx], dtype=bool)
        price_src = data.open if config.fill == "open" else data.close
        px = np.asarray(price_src[:, sym_idx], dtype=np.float64)
        close = np.asarray(data.close[:, sym_idx], dtype=np.float64)
        vol = np.asarray(data.volume[:, sym_idx], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            has_volume = np.isfinite(vol) & (vol > 0)  # (T, S); a bar without volume is not tradable
        # symbols whose data carries no volume at all (FX, indices) trade only under an explicit flat cost model
        self._volume_free = ~has_volume.any(0)  # (S,)
        if self._volume_free.any():
            if config.volume_free_cost_bps is None:
                names = [self.symbols[s] for s in np.flatnonzero(self._volume_free)]
                raise UserInputError(
                    f"Symbols {names[:10]} have no volume in the data, so the slippage model (square-root impact on "
                    "the bar's dollar volume) cannot price their orders. Pass --env.volume-free-cost-bps N (a flat "
                    "slippage per side, e.g. 1 for major FX pairs) to trade them, or leave them out with "
                    "--data.symbols."
                )
            has_volume |= self._volume_free[None, :]
        tradable = tradable & has_volume
        fill_ok = tradable & np.isfinite(px) & (px > 0)
        self._fill_ok = np.ascontiguousarray(fill_ok)
        self._fill_px = np.ascontiguousarray(np.where(fill_ok, px, 1.0))  # dummy 1.0 where the fill is cancelled
        with np.errstate(invalid="ignore"):
            dollar_vol = np.where(self._volume_free[None, :], np.inf, vol * close)
        self._decide_ok = np.ascontiguousarray(tradable & np.isfinite(close) & (dollar_vol > 0))
        self._dollar_vol = np.ascontiguousarray(np.where(self._decide_ok, dollar_vol, 1.0))
        self._flat_slip = np.where(self._volume_free, (config.volume_free_cost_bps or 0.0) / 1e4, 0.0)  # (S,)
        # delisting: a symbol whose data ends before the sample's last bar is sold at its last close (-1: never)
        last = T - 1 - np.argmax(np.isfinite(close)[::-1], axis=0)  # (S,) last bar with a close
        self._delist_bar = np.where(last < T - 1, last, -1)
        logret = np.zeros_like(valuation_close)
        logret[1:] = np.log(valuation_close[1:] / valuation_close[:-1])
        _, self._vol = _rolling_mean_std(logret, 24)
        self._mean_close, _ = _rolling_mean_std(valuation_close, 24)

    def _load_observation_arrays(self, market: PreparedMarket, sym_idx: np.ndarray) -> None:
        """The market's observation tables for the chosen symbols: technical windows, sl_probs (T, S, 3) and the
        clipped regime (T, R), float32."""
        S, T, L = self.num_symbols, self.T, self.lookback
        # technical laid out (S, T, F) and viewed as rows (S * T, F): row s * T + t - L + 1 + l is row l of the window
        # of (t, s), so one np.take(..., out=obs) copies all E * S windows once, straight into the buffer (a fancy
        # index on a strided window view copies twice; np.take on that view would copy the whole view first)
        F = market.technical.shape[2]
        tech_st = np.ascontiguousarray(np.asarray(market.technical[:, sym_idx], dtype=np.float32).transpose(1, 0, 2))
        self._tech_rows = tech_st.reshape(S * T, F)
        self._tech_base = (np.arange(S) * T)[:, None] + np.arange(L)[None, :] - (L - 1)  # (S, L)
        self._sl = np.ascontiguousarray(market.sl_probs[:, sym_idx], dtype=np.float32)
        self._regime = np.ascontiguousarray(np.clip(market.regime, -OBS_CLIP, OBS_CLIP), dtype=np.float32)

    def _allocate_observations(self) -> None:
        """The observation buffers (E, S, ...), final_obs beside them, and the index scratch of _write_obs."""
        E, S, L = self.num_envs, self.num_symbols, self.lookback
        self.observation_shapes = {
            "technical": (L, self._tech_rows.shape[1]),
            "sl_probs": (3,),
            "position": (5,),
            "portfolio": (8,),
            "regime": (self._regime.shape[1],),
            "action_mask": (NUM_ACTIONS,),
        }
        if self.mode == "portfolio":
            self.observation_shapes["directives"] = (4,)
        self.obs = {
            k: np.zeros((E, S, *shape), dtype=np.int8 if k == "action_mask" else np.float32)
            for k, shape in self.observation_shapes.items()
        }
        self.final_obs = {k: np.zeros_like(v) for k, v in self.obs.items()}
        self._portfolio_by_account = self.obs["portfolio"].reshape(
            E, self.accounts_per_env, self.symbols_per_account, 8
        )  # a view: see _VIEWS
        self._tech_idx = np.zeros((E, S, L), dtype=np.int64)
        self._rows = np.arange(E * S)

    def _allocate_directives(self) -> None:
        """Per-env directive parameters (E,): fixed in independent mode, set by set_directives in portfolio mode."""
        E, config = self.num_envs, self.config
        self._risk = np.ones(E)
        self._cap = np.full(E, config.position_cap)
        self._limit = np.full(E, self.symbols_per_account, dtype=np.int64)
        self._ceiling = np.full(E, config.max_exposure)
        self._defensive = np.zeros(E, dtype=bool)
        self.directive_index = np.full(E, -1, dtype=np.int64)
        self._directive_constants()

    @staticmethod
    def _symbol_indices(names: list[str], symbols) -> np.ndarray:
        if symbols is None:
            return np.arange(len(names))
        out = []
        for s in symbols:
            if isinstance(s, (int, np.integer)):
                if not 0 <= int(s) < len(names):
                    raise ValueError(f"Symbol index {s} is out of range for a market of {len(names)} symbols.")
                out.append(int(s))
            elif s in names:
                out.append(names.index(s))
            else:
                raise ValueError(f"Symbol {s!r} is not in the market; available: {names[:10]}...")
        if not out:
            raise ValueError("symbols=[] selects nothing: pass None for all symbols or a non-empty list.")
        return np.asarray(out)

    def _allocate_state(self) -> None:
        E, S, A = self.num_envs, self.num_symbols, self.accounts_per_env
        W, Wd = self.config.risk_window, self.config.diversity_window
        self.t = np.zeros(E, dtype=np.int64)  # current (decision) bar of each env
        self.end = np.zeros(E, dtype=np.int64)  # last bar of each env's episode
        self.shares = np.zeros((E, S))
        self.basis = np.zeros((E, S))  # average cost per share, costs included
        self.hold = np.zeros((E, S))  # bars held
        self.cash = np.zeros((E, A))
        self.equity = np.zeros((E, A))
        self.peak = np.zeros((E, A))
        self.realized_total = np.zeros((E, A))
        self.pos_value = np.zeros((E, S))
        self._trip_pnl = np.zeros((E, S))  # realised PnL of the open round trip, net of its costs
        # stop-outs: halted accounts trade no more (HOLD only) and sell what they hold; stopped ones (evaluation
        # only) are flat and stay so until the episode ends
        self.halted = np.zeros((E, A), dtype=bool)
        self.stopped = np.zeros((E, A), dtype=bool)
        # rolling account returns: ring (E, A, W) with running sums, one write position for all (the clock is shared)
        self._ret_ring = np.zeros((E, A, W))
        self._ret_n = np.zeros((E, A))
        self._ret_sum = np.zeros((E, A))
        self._ret_sq = np.zeros((E, A))
        self._ret_neg = np.zeros((E, A))
        self._ret_pos = 0
        self.sharpe = np.zeros((E, A))
        self.sortino = np.zeros((E, A))
        # anti-collapse: last limiter output and run length per slot; window of executed action classes (0 hold,
        # 1 increase, 2 decrease) as a ring (E, S, Wd) with per-slot counts (E * S, 4), column 3 counting empty cells
        self._last_action = np.zeros((E, S), dtype=np.int64)
        self._run = np.zeros((E, S), dtype=np.int64)
        self._div_ring = np.full((E, S, Wd), 3, dtype=np.int64)
        self._div_count = np.zeros((E * S, 4), dtype=np.int64)
        self._div_count[:, 3] = Wd
        self._div_pos = 0
        # episode accumulators, per slot (E, S) unless stated
        self._ep = {k: np.zeros((E, S)) for k in EPISODE_COUNTERS}
        self._ep_acc = {k: np.zeros((E, A)) for k in ("n", "sum", "sq", "neg", "max_drawdown")}
        self._ep_policy_counts = np.zeros((E * S, NUM_ACTIONS))
        self._ep_exec_counts = np.zeros((E * S, NUM_ACTIONS))

    # ------------------------------------------------------------------ accounts and episodes
    def _acc_to_slot(self, x: np.ndarray) -> np.ndarray:
        """(E, A) account values -> (E, S) slot values (a view in portfolio mode)."""
        if self.symbols_per_account == 1:
            return x
        return np.broadcast_to(x, (self.num_envs, self.num_symbols))

    def _acc_sum(self, x: np.ndarray) -> np.ndarray:
        """(E, S) slot values -> (E, A) sums over each account's slots."""
        if self.symbols_per_account == 1:
            return x
        return x.sum(axis=1, keepdims=True)

    def _new_starts(self, envs: np.ndarray) -> None:
        """Draw start and end bars for the given env indices."""
        lo, last = self.split_start, self.split_last
        if self.sequential:
            self.t[envs] = lo
            self.end[envs] = last
            return
        length = min(self.config.episode_length, last - lo)
        self.t[envs] = self._rng.integers(lo, last - length + 1, size=len(envs))
        self.end[envs] = self.t[envs] + length

    def _reset_accounts(self, acc: np.ndarray) -> None:
        """Fresh accounts where acc (E, A) is True, and fresh slot state for their slots."""
        slot = self._acc_to_slot(acc)
        C = self.capital
        self.cash[acc] = C
        self.equity[acc] = C
        self.peak[acc] = C
        self.realized_total[acc] = 0.0
        self.halted[acc] = False
        self.stopped[acc] = False
        for x in (self._ret_n, self._ret_sum, self._ret_sq, self._ret_neg, self.sharpe, self.sortino):
            x[acc] = 0.0
        self._ret_ring[acc] = 0.0
        for x in self._ep_acc.values():
            x[acc] = 0.0
        for x in (self.shares, self.basis, self.hold, self.pos_value, self._trip_pnl, self._last_action, self._run):
            x[slot] = 0
        self._div_ring[slot] = 3
        flat = slot.reshape(-1)
        self._div_count[flat] = 0
        self._div_count[flat, 3] = self.config.diversity_window
        for x in self._ep.values():
            x[slot] = 0.0
        self._ep_policy_counts[flat] = 0
        self._ep_exec_counts[flat] = 0

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Start every env afresh; returns the observation buffers (E, S, ...)."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._new_starts(np.arange(self.num_envs))
        self._reset_accounts(np.ones((self.num_envs, self.accounts_per_env), dtype=bool))
        self._ret_pos = 0
        self._div_pos = 0
        self._write_obs()
        self._ready = True
        return self.obs

    def observe_flat(self, bars) -> dict[str, np.ndarray]:
        """The observation buffers (E, S, ...) of fresh, flat accounts at the given decision bars (E,) of the split,
        [split_start, split_last): what an agent holding nothing sees there, for any bars one chooses (the
        pretraining of ppo_symbol_agent.py draws them uniformly). It moves the envs to those bars and starts their
        accounts afresh, so call reset() before stepping again."""
        bars = np.asarray(bars)
        if bars.shape != (self.num_envs,) or not np.issubdtype(bars.dtype, np.integer):
            raise ValueError(f"bars must be an integer array of shape ({self.num_envs},), got {bars.shape}.")
        if (bars < self.split_start).any() or (bars >= self.split_last).any():
            raise ValueError(f"bars must lie in [{self.split_start}, {self.split_last}), the split's decision bars.")
        self._reset_accounts(np.ones((self.num_envs, self.accounts_per_env), dtype=bool))
        self.t[:] = bars
        self._write_obs()
        self._ready = False  # the episodes' ends no longer fit their bars: reset() before step()
        return self.obs

    # ------------------------------------------------------------------ directives (portfolio mode)
    def set_directives(self, directive_index) -> None:
        """Portfolio mode: set each env's directive, an index (E,) into the 5 x 4 x 3 grid (see the class table).
        Takes effect at once: the current observation's mask and directives are rewritten."""
        if self.mode != "portfolio":
            raise ValueError("set_directives needs mode='portfolio'; independent-mode slots have no master.")
        idx = np.asarray(directive_index)
        if idx.shape != (self.num_envs,) or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"directive_index must be an integer array of shape ({self.num_envs},), got {idx.dtype} {idx.shape}."
            )
        if (idx < 0).any() or (idx >= NUM_DIRECTIVES).any():
            raise ValueError(f"directive_index values must lie in [0, {NUM_DIRECTIVES}); got {idx.min()}..{idx.max()}.")
        vals = directive_values(idx)  # (E, 4)
        self.directive_index[:] = idx
        self._risk[:] = vals[:, 0]
        self._cap[:] = vals[:, 1]
        self._limit[:] = np.ceil(vals[:, 2] * self.num_symbols - 1e-9).astype(np.int64)
        reg = np.round(vals[:, 3]).astype(np.int64) + 1
        self._ceiling[:] = np.take(REGIME_MAX_EXPOSURE, reg)
        self._defensive[:] = reg == 0
        self._directive_constants()
        self.obs["directives"][:] = vals[:, None, :].astype(np.float32)
        if self._ready:
            self._write_mask(*self._holding_and_fractions())

    def _directive_constants(self) -> None:
        """Mask thresholds that change only with the directives, (E, 1) or (E, 1, 3), for _write_mask. Each is an
        array of its own (not a view), so code that saves and restores the core's arrays in place restores these too."""
        c = self.commission + self.config.cash_buffer
        risk = self._risk[:, None]
        cap = self._cap[:, None, None]
        buy_frac = BUY_SIZES[None, None, :] * self._risk[:, None, None]  # (E, 1, 3)
        self._m_buy_cash = buy_frac * (1.0 + c)  # cash fraction a BUY_* needs
        self._m_buy_ok = (buy_frac <= cap + 1e-12) & (buy_frac > 0)  # the BUY_* fits under the cap; risk 0: no BUY
        self._m_buy_ok[:, :, 2] &= ~self._defensive[:, None]  # defensive: no BUY_LARGE
        self._m_add_cash = ADD_SIZE * risk * (1.0 + c)  # cash fraction an ADD needs
        self._m_cap = self._cap[:, None] - 1e-9
        self._m_ceiling = self._ceiling[:, None]
        self._m_limit = self._limit[:, None]
        self._m_add_ok = ~self._defensive[:, None] & (risk > 0)  # defensive or risk 0: no ADD

    # ------------------------------------------------------------------ observation
    def _holding_and_fractions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Quantities both the observation and the mask use, computed once: holding (E, S), cash / equity (E, A),
        exposure = 1 - cash / equity (E, A), position value / equity (E, S)."""
        cash_frac = self.cash / self.equity
        return self.shares > 0, cash_frac, 1.0 - cash_frac, self.pos_value / self._acc_to_slot(self.equity)

    def _write_mask(self, holding, cash_frac_acc, exposure_acc, pos_frac) -> None:
        """action_mask (E, S, 7) for the current bar from the current state (arguments: see _holding_and_fractions)."""
        m = self.obs["action_mask"].view(bool)  # int8 0/1 written as bool: the same bytes
        ok = self._decide_ok[self.t] & ~self._acc_to_slot(self.halted)  # (E, S); a halted account only holds
        cash_frac = self._acc_to_slot(cash_frac_acc)  # (E, S)
        room = self._acc_to_slot(exposure_acc) < self._m_ceiling
        if self.symbols_per_account == 1:  # independent mode: the limit is 1 open position per account, the slot's own
            can_open = ok & ~holding & room
        else:
            open_n = self._acc_to_slot(self._acc_sum(holding.astype(np.int64)))
            can_open = ok & ~holding & room & (open_n < self._m_limit)
        np.greater_equal(cash_frac[..., None], self._m_buy_cash, out=m[..., 1:4])
        m[..., 1:4] &= self._m_buy_ok
        m[..., 1:4] &= can_open[..., None]
        np.logical_and(ok, holding, out=m[..., 4])
        m[..., 5] = m[..., 4]
        add = m[..., 6]
        np.logical_and(m[..., 4], room, out=add)
        add &= cash_frac >= self._m_add_cash
        add &= pos_frac < self._m_cap
        add &= self._m_add_ok
        m[..., 0] = True

    def _write_obs(self) -> None:
        """Write every observation key for the current bar into the preallocated buffers (position and portfolio
        features clipped to +-OBS_CLIP, so every observation is finite and bounded)."""
        t = self.t
        o = self.obs
        rows = np.add(t[:, None, None], self._tech_base, out=self._tech_idx)  # (E, S, L)
        np.take(self._tech_rows, rows, axis=0, out=o["technical"], mode="clip")  # (E, S, L, F); rows are in range
        np.take(self._sl, t, axis=0, out=o["sl_probs"])
        if self.config.symbol_regime:
            o["regime"][:] = self._regime[t][:, None, :]
        mark = self._valuation_close[t]  # (E, S)
        holding, cash_frac, exposure, pos_frac = self._holding_and_fractions()
        position = o["position"]  # (E, S, 5)
        position[..., 0] = np.divide(self.basis, mark, out=np.ones(mark.shape), where=holding) - 1.0
        position[..., 1] = pos_frac
        position[..., 2] = np.divide(mark, self.basis, out=np.ones(mark.shape), where=holding) - 1.0
        position[..., 3] = self.hold / HOLD_TIME_SCALE
        position[..., 4] = holding
        portfolio = self._portfolio_by_account  # (E, A, K, 8): one account's features written to its K slots
        C = self.capital
        portfolio[..., 0] = (self.equity / C)[..., None]
        portfolio[..., 1] = exposure[..., None]
        portfolio[..., 2] = self.sharpe[..., None]
        portfolio[..., 3] = self.sortino[..., None]
        portfolio[..., 4] = (self.realized_total / C)[..., None]
        portfolio[..., 5] = cash_frac[..., None]
        portfolio[..., 6] = (1.0 - self.equity / self.peak)[..., None]
        portfolio[..., 7] = (self._acc_sum(holding.astype(np.float64)) / self.symbols_per_account)[..., None]
        np.clip(position, -OBS_CLIP, OBS_CLIP, out=position)
        np.clip(o["portfolio"], -OBS_CLIP, OBS_CLIP, out=o["portfolio"])
        self._write_mask(holding, cash_frac, exposure, pos_frac)

    # ------------------------------------------------------------------ step
    def _check_actions(self, actions) -> np.ndarray:
        if not self._ready:
            raise RuntimeError("VecTradingCore.step() was called before reset(): call reset() first.")
        a = np.asarray(actions)
        shape = (self.num_envs, self.num_symbols)
        if a.shape != shape:
            raise ValueError(f"actions must have shape (num_envs, num_symbols) = {shape}, got {a.shape}.")
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"actions must be integers (action ids 0..6), got dtype {a.dtype}; cast with .astype(int).")
        if a.size and (np.minimum.reduce(a, axis=None) < 0 or np.maximum.reduce(a, axis=None) >= NUM_ACTIONS):
            raise ValueError(f"actions must lie in [0, {NUM_ACTIONS - 1}], got values {a.min()}..{a.max()}.")
        return a.astype(np.int64, copy=False)

    def step(self, actions):
        """Decide `actions` (E, S) on the current bar; returns obs, reward (E, S) float32, terminated, truncated
        (E, S) bool, info (see the class docstring for the autoreset contract). The phases, in order, hand on the
        records defined above this class: sanitise the policy's actions (repetition limiter, mask, stop-out
        liquidation), size the orders at bar t, price the fills at bar t+1 (slippage, commission), update the accounts
        (clock, marks, delisting sales, risk state), the anti-collapse window, the reward, the telemetry, then end
        episodes and observe."""
        decisions = self._sanitise(self._check_actions(actions))
        orders = self._size_orders(decisions)
        fills = self._price_fills(decisions, orders)
        fills, accounts = self._update_accounts(fills)  # the fills gain the delisting sales
        diversity = self._update_diversity(fills)
        reward = self._reward(decisions, fills, accounts, diversity)
        info = self._telemetry(decisions, fills, accounts, diversity, reward)
        terminated, truncated = self._end_episodes(accounts, info)
        return self.obs, reward.astype(np.float32, copy=False), terminated, truncated, info

    # ------------------------------------------------------------------ step phases
    def _sanitise(self, policy: np.ndarray) -> Decisions:
        """Phase 1: the executed action (E, S) from the policy's. Repetition limiter on the policy's actions (seed
        003: the history keeps the limiter's output, so a forced HOLD restarts the run), then the mask; both turn the
        action into HOLD. A halted account's positions are sold (SELL_ALL, `liquidation`) whatever the policy says."""
        cfg = self.config
        E, S = self.num_envs, self.num_symbols
        nonhold = policy != HOLD
        if cfg.anti_collapse:
            run = np.where(nonhold & (policy == self._last_action), self._run + 1, nonhold.astype(np.int64))
            violation = run > cfg.max_consecutive
            after_limit = np.where(violation, HOLD, policy)
            self._last_action = after_limit
            self._run = np.where(violation, 0, run)
        else:
            run = np.zeros((E, S), dtype=np.int64)
            violation = np.zeros((E, S), dtype=bool)
        mask = self.obs["action_mask"]
        masked = mask.reshape(-1, NUM_ACTIONS)[self._rows, policy.reshape(-1)].reshape(E, S) == 0
        executed = np.where(violation | masked, HOLD, policy)
        forced = nonhold & (executed == HOLD)
        liquidation = self._acc_to_slot(self.halted) & (self.shares > 0)
        if liquidation.any():
            executed = np.where(liquidation, SELL_ALL, executed)
        return Decisions(policy, executed, nonhold, run, violation, masked, forced, liquidation)

    def _size_orders(self, decisions: Decisions) -> Orders:
        """Phase 2: the executed actions as orders sized at the decision bar t. A buy is a fraction of equity x the
        risk multiplier, shrunk to the room under the position cap and to max_participation of the bar's dollar
        volume; a sell is a fraction of the shares (all of them when the rest would be below min_notional), shrunk to
        the participation too. Orders whose fill bar t+1 is not tradable, and in portfolio mode new positions beyond
        the open-position limit, are cancelled; then each account's buys shrink together to its cash after its sells
        (before slippage) and to the room under the exposure ceiling, and buys below min_notional are cancelled.
        Reads the state, changes nothing."""
        cfg, executed, commission = self.config, decisions.executed, self.commission
        t = self.t
        mark = self._valuation_close[t]  # (E, S) the decision bar's valuation close, at which positions are marked
        bar_price = self._fill_px[t + 1]
        equity = self._acc_to_slot(self.equity)
        dv_cap = cfg.max_participation * self._dollar_vol[t]  # (E, S) largest order notional at the decision bar
        buy = _BUY_FRACTION.take(executed) * self._risk[:, None] * equity  # (E, S) buy notional
        cap_room = np.maximum(self._cap[:, None] * equity - self.pos_value, 0.0)
        shrunk = buy > np.minimum(cap_room, dv_cap) * (1 + 1e-12)
        buy = np.minimum(np.minimum(buy, cap_room), dv_cap)
        sell = self.shares * _SELL_FRACTION.take(executed)  # (E, S) shares to sell
        left = (self.shares - sell) * mark  # a sell that would leave less than the minimum notional sells all
        sell = np.where((sell > 0) & (left < self.min_notional), self.shares, sell)
        sell_max = dv_cap / mark
        shrunk |= sell > sell_max * (1 + 1e-12)
        sell = np.minimum(sell, sell_max)
        cancelled = (executed != HOLD) & ~self._fill_ok[t + 1]
        if self.mode == "portfolio":  # new positions beyond the open-position limit: cancelled in symbol order
            new = (buy > 0) & (executed != ADD) & ~cancelled
            open_n = (self.shares > 0).sum(1, keepdims=True)
            cancelled |= new & (open_n + np.cumsum(new, axis=1) > self._limit[:, None])
        buy[cancelled] = 0.0
        sell[cancelled] = 0.0
        sell_notional = sell * bar_price
        # buys share the account's cash after its sells and the room under the exposure ceiling, (E, A)
        buy_acc = self._acc_sum(buy)
        buy_cash_acc = self._acc_sum(buy * (1.0 + commission))
        cash_avail = self.cash + self._acc_sum(sell_notional * (1.0 - commission))  # an upper bound: no slippage yet
        held_after_sells = self._acc_sum((self.shares - sell) * mark)
        exposure_room = np.maximum(self._ceiling[:, None] * self.equity - held_after_sells, 0.0)
        scale = np.minimum(
            np.divide(exposure_room, buy_acc, out=np.ones(buy_acc.shape), where=buy_acc > 0),
            np.divide(cash_avail, buy_cash_acc, out=np.ones(buy_cash_acc.shape), where=buy_cash_acc > 0),
        )
        np.minimum(scale, 1.0, out=scale)
        scale_slot = self._acc_to_slot(scale)
        shrunk |= (scale_slot < 1.0) & (buy > 0)
        buy = buy * scale_slot
        small = (buy > 0) & (buy < self.min_notional)  # buys below the minimum notional are cancelled
        if small.any():
            cancelled |= small
            buy = np.where(small, 0.0, buy)
        return Orders(buy, sell, sell_notional, bar_price, cancelled, shrunk)

    def _slippage(self, notional: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Slippage fraction (E, S) per side of orders of `notional` (E, S) decided on bars t (E,): the half spread
        plus square-root impact on the bar's dollar volume, or the flat cost of a symbol without volume data, capped
        at max_slippage_bps (the class docstring's formula)."""
        cfg = self.config
        impact = cfg.impact_coef * self._vol[t] * np.sqrt(notional / self._dollar_vol[t])
        return np.minimum(cfg.spread_bps / 1e4 + impact + self._flat_slip, cfg.max_slippage_bps / 1e4)

    def _price_fills(self, decisions: Decisions, orders: Orders) -> Fills:
        """Phase 3: the sized orders filled at bar t+1: slippage on each order's notional (_slippage), commission on
        both sides, one more shrink of the buys where slippage on the sells left the account short of cash (cash
        never goes negative), then the fills' costs, realised PnL and timing. Reads the state, changes nothing."""
        commission, executed = self.commission, decisions.executed
        buy, sell, bar_price, shrunk = orders.buy_notional, orders.sell_shares, orders.bar_price, orders.shrunk
        slip = self._slippage(buy + orders.sell_notional, self.t)
        sell_price = bar_price * (1.0 - slip)
        buy_price = bar_price * (1.0 + slip)
        proceeds = sell * sell_price * (1.0 - commission)
        cash_in = self.cash + self._acc_sum(proceeds)  # (E, A) cash before the buys
        buy_cash = buy * (1.0 + commission)
        cash_after = cash_in - self._acc_sum(buy_cash)
        cash_short = cash_after < 0  # (E, A) the sizing's cash check had no slippage on the sells
        if cash_short.any():
            scale = np.divide(cash_in, self._acc_sum(buy_cash), out=np.ones(cash_short.shape), where=cash_short)
            scale_slot = self._acc_to_slot(np.where(cash_short, scale * (1 - 1e-12), 1.0))
            shrunk = shrunk | ((scale_slot < 1.0) & (buy > 0))
            buy = buy * scale_slot
            buy_cash = buy * (1.0 + commission)
            cash_after = cash_in - self._acc_sum(buy_cash)
        bought = buy / buy_price
        commission_paid = commission * (buy + sell * sell_price)
        buying, selling = bought > 0, sell > 0
        traded = buying | selling
        ref = self._mean_close[self.t]  # (E, S) the 24-bar mean close at the decision: the timing reference
        improvement = np.where(buying, (ref - buy_price) / ref, np.where(selling, (sell_price - ref) / ref, 0.0))
        clip = self.config.reward.timing_clip
        return Fills(
            cancelled=orders.cancelled,
            shrunk=shrunk & ~orders.cancelled,
            buy_notional=buy,
            buy_cash=buy_cash,
            bought=bought,
            sell_shares=sell,
            bar_price=bar_price,
            proceeds=proceeds,
            cash_after=cash_after,
            buying=buying,
            selling=selling,
            traded=traded,
            cost=commission_paid + bought * (buy_price - bar_price) + sell * (bar_price - sell_price),
            realized=sell * (sell_price * (1.0 - commission) - self.basis),
            sold_basis=sell * self.basis,
            timing=np.clip(improvement, -clip, clip) * (buy + sell * sell_price),
            fill_price=np.where(buying, buy_price, np.where(selling, sell_price, 0.0)),
            voluntary=(executed != HOLD) & (executed == decisions.policy) & traded & ~decisions.liquidation,
        )

    def _update_accounts(self, fills: Fills) -> tuple[Fills, Accounts]:
        """Phase 4: book the fills, advance the clock to t+1, mark to market at valuation_close[t+1], sell delisted
        symbols at their last close (_delist, which adds those sales to the fills), close round trips and update the
        risk state (peak, drawdown, rolling returns). Returns the fills with the delisting sales and the accounts."""
        equity_before = self.equity  # self.equity is rebound below, never written in place during the step
        mark_before = self._valuation_close[self.t]
        old_shares = self.shares
        new_shares = old_shares - fills.sell_shares + fills.bought
        new_cost = old_shares * self.basis - fills.sell_shares * self.basis + fills.buy_cash  # (E, S) cost basis
        new_basis = np.divide(new_cost, new_shares, out=np.zeros(new_shares.shape), where=new_shares > 0)
        self.t = t1 = self.t + 1
        mark = self._valuation_close[t1]
        delisted = (t1[:, None] == self._delist_bar) & (new_shares > 0)  # (E, S) the symbol's last bar
        if delisted.any():  # sold at its last close with commission and slippage, like any order
            fills = self._delist(fills, delisted, new_shares, new_basis, mark)
            new_shares = np.where(delisted, 0.0, new_shares)
        new_pos = new_shares > 0
        self.cash = fills.cash_after
        self.shares = new_shares
        self.basis = np.where(new_pos, new_basis, 0.0)
        self.hold = np.where(new_pos, np.where(old_shares > 0, self.hold + 1, 0.0), 0.0)
        self.pos_value = new_shares * mark
        slot_pnl = self.pos_value - old_shares * mark_before + fills.proceeds - fills.buy_cash
        self.equity = self.cash + self._acc_sum(self.pos_value)
        self.realized_total += self._acc_sum(fills.realized)
        self._trip_pnl += fills.realized
        closed = (old_shares + fills.bought > 0) & ~new_pos  # a round trip ends when the slot is flat again
        won = closed & (self._trip_pnl > 0)
        self._trip_pnl[closed] = 0.0
        bar_return = self.equity / equity_before - 1.0
        np.maximum(self.peak, self.equity, out=self.peak)
        drawdown = 1.0 - self.equity / self.peak
        downside_sq = np.minimum(bar_return, 0.0) ** 2
        self._push_return(bar_return, downside_sq)
        exposure = 1.0 - self.cash / self.equity
        return fills, Accounts(t1, bar_return, downside_sq, drawdown, slot_pnl, exposure, closed, won, delisted)

    def _delist(self, fills: Fills, delisted: np.ndarray, shares: np.ndarray, basis: np.ndarray, price) -> Fills:
        """The fills with a sale of every share in the delisted slots (E, S) at `price` (E, S) (the last close), with
        commission and slippage as for an order decided on that bar; `shares` and `basis` (E, S) are the position
        after this step's fills."""
        commission = self.commission
        sold = np.where(delisted, shares, 0.0)
        sell_price = price * (1.0 - self._slippage(sold * price, self.t))
        proceeds = sold * sell_price * (1.0 - commission)
        return fills._replace(
            cash_after=fills.cash_after + self._acc_sum(proceeds),
            proceeds=fills.proceeds + proceeds,
            sell_shares=fills.sell_shares + sold,
            cost=fills.cost + commission * sold * sell_price + sold * (price - sell_price),
            realized=fills.realized + sold * (sell_price * (1.0 - commission) - basis),
            sold_basis=fills.sold_basis + sold * basis,
            selling=fills.selling | delisted,
            traded=fills.traded | delisted,
            fill_price=np.where(delisted, sell_price, fills.fill_price),
        )

    def _update_diversity(self, fills: Fills) -> Diversity:
        """Phase 5: the anti-collapse window of executed action classes (hold, increase, decrease: what was filled),
        a ring (E, S, diversity_window) with per-slot class counts."""
        E, S, Wd = self.num_envs, self.num_symbols, self.config.diversity_window
        classes = np.where(fills.buying, 1, np.where(fills.selling, 2, 0)).reshape(-1)
        old = self._div_ring[:, :, self._div_pos].reshape(-1)
        self._div_count[self._rows, old] -= 1
        self._div_count[self._rows, classes] += 1
        self._div_ring[:, :, self._div_pos] = classes.reshape(E, S)
        self._div_pos = (self._div_pos + 1) % Wd
        distinct = (self._div_count[:, :3] > 0).sum(1).reshape(E, S)
        return Diversity(distinct, self.shaper.diversity_tier(distinct, (Wd - self._div_count[:, 3]).reshape(E, S)))

    def _reward(self, decisions: Decisions, fills: Fills, accounts: Accounts, diversity: Diversity) -> np.ndarray:
        """Phase 6: every reward component into self._components (10, E, S) and the weighted sum (E, S)."""
        E, S = self.num_envs, self.num_symbols
        if self.symbols_per_account > 1:
            w = self.pos_value
            tot = w.sum(1, keepdims=True)
            hhi = np.divide((w * w).sum(1, keepdims=True), tot * tot, out=np.ones_like(tot), where=tot > 0)
            divers = np.broadcast_to(1.0 - hhi, (E, S))
        else:
            divers = 0.0
        sharpe = np.where(self._ret_n >= self.config.risk_min_count, self.sharpe, 0.0)
        notional = fills.buy_notional + fills.sell_shares * fills.bar_price
        return self.shaper.compute(
            self._components,
            pnl=accounts.slot_pnl,
            realized=fills.realized,
            sold_basis=fills.sold_basis,
            cost=fills.cost,
            timing=fills.timing,
            sharpe=self._acc_to_slot(sharpe),
            drawdown=self._acc_to_slot(accounts.drawdown),
            exposure=self._acc_to_slot(accounts.exposure),
            diversification=divers,
            tier=diversity.tier,
            run=decisions.run,
            intrinsic_notional=np.where(fills.voluntary, notional, 0.0),
            holdings=self.pos_value,
            capital=self.capital,
            slots=self.symbols_per_account,
            max_consecutive=self.config.max_consecutive,
        )

    def _telemetry(self, decisions: Decisions, fills: Fills, accounts: Accounts, diversity: Diversity, reward) -> dict:
        """Phase 7: the episode accumulators and the step's info dict (per slot; see the class docstring)."""
        liquidation = decisions.liquidation | accounts.delisted
        ep = self._ep
        ep["length"] += 1
        ep["reward"] += reward
        ep["cost"] += fills.cost
        ep["turnover"] += fills.buy_notional + fills.sell_shares * fills.bar_price
        ep["trades"] += fills.traded
        ep["violations"] += decisions.violation
        ep["masked_attempts"] += decisions.masked
        ep["forced_holds"] += decisions.forced
        ep["voluntary_trades"] += fills.voluntary
        ep["policy_trades"] += decisions.nonhold
        ep["diversity_bonus"] += diversity.tier
        ep["order_cancelled"] += fills.cancelled
        ep["order_shrunk"] += fills.shrunk
        ep["round_trips"] += accounts.closed
        ep["winning_trips"] += accounts.won
        ep["liquidations"] += liquidation
        self._ep_policy_counts[self._rows, decisions.policy.reshape(-1)] += 1
        self._ep_exec_counts[self._rows, decisions.executed.reshape(-1)] += 1
        e = self._ep_acc
        e["n"] += 1
        e["sum"] += accounts.bar_return
        e["sq"] += accounts.bar_return * accounts.bar_return
        e["neg"] += accounts.downside_sq
        np.maximum(e["max_drawdown"], accounts.drawdown, out=e["max_drawdown"])
        return {
            "policy_action": decisions.policy,
            "executed_action": decisions.executed,
            "masked_attempt": decisions.masked,
            "forced_hold": decisions.forced,
            "voluntary_trade": fills.voluntary,
            "violations": decisions.violation,
            "liquidation": liquidation,
            "order_cancelled": fills.cancelled,
            "order_shrunk": fills.shrunk,
            "traded_shares": fills.bought - fills.sell_shares,
            "fill_price": fills.fill_price,
            "cost": fills.cost,
            "equity": self._acc_to_slot(self.equity).copy(),
            "exposure": self._acc_to_slot(accounts.exposure),
            "cash": self._acc_to_slot(self.cash).copy(),
            "holdings": self.pos_value.copy(),  # a copy: the end-of-sweep reset zeroes pos_value
            "pnl": accounts.slot_pnl,
            "account_return": self._acc_to_slot(accounts.bar_return),
            "drawdown": self._acc_to_slot(accounts.drawdown),
            "round_trip_closed": accounts.closed,
            "round_trip_won": accounts.won,
            "diversity_bonus": diversity.tier,
            "unique_classes": diversity.classes,
            "reward_components": dict(zip(REWARD_COMPONENTS, self._components, strict=True)),
            "bar": accounts.t1.copy(),
        }

    def _end_episodes(self, accounts: Accounts, info: dict) -> tuple[np.ndarray, np.ndarray]:
        """Phase 8: stop-outs, truncation per env, termination per account, the observation of bar t+1 and the
        same-step autoreset (final_obs, the ended episodes' statistics, fresh starts or, in evaluation, a stopped
        account that stays flat). Returns terminated, truncated (E, S)."""
        cfg = self.config
        trunc_env = accounts.t1 >= self.end
        breach = (self.equity < cfg.ruin_fraction * self.capital) | (accounts.drawdown >= cfg.max_drawdown)
        flat = (
            ~self._acc_sum(self.shares > 0)
            if self.symbols_per_account == 1
            else ~(self.shares > 0).any(1, keepdims=True)
        )
        # halted accounts end their episode once flat (a breach while flat ends it at once); stopped ones are done
        term_acc = (self.halted | breach) & flat & ~self.stopped
        self.halted |= breach
        terminated = self._acc_to_slot(term_acc).copy()
        truncated = trunc_env[:, None] & ~terminated  # (E, 1) & (E, S)
        done = terminated | truncated
        if self.sequential:  # evaluation: a terminated account stays as it is, flat and halted, until the end
            self.stopped |= term_acc
            restart_acc = np.broadcast_to(trunc_env[:, None], term_acc.shape)
        else:
            restart_acc = term_acc | trunc_env[:, None]
        self._write_obs()
        info.update(done_mask=done, final_obs=self.final_obs, episode=self._no_episode)
        if done.any():
            for k, v in self.obs.items():
                np.copyto(self.final_obs[k], v)
            info["episode"] = self._episode_stats(done)
        if restart_acc.any():
            ended_envs = np.flatnonzero(trunc_env)
            if len(ended_envs):
                self._new_starts(ended_envs)
            self._reset_accounts(restart_acc)
            self._write_obs()
        return terminated, truncated

    def _push_return(self, r: np.ndarray, r_neg_sq: np.ndarray) -> None:
        """Add the account returns r (E, A) (r_neg_sq = min(r, 0) ** 2) to the rolling window and refresh the rolling
        Sharpe / Sortino (per bar, 0 until risk_min_count returns, clipped to +-RISK_RATIO_CLIP). The running sums are
        recomputed from the ring once per window, so float residue cannot build up."""
        W = self.config.risk_window
        p = self._ret_pos
        old = self._ret_ring[:, :, p]
        self._ret_sum += r - old
        self._ret_sq += r * r - old * old
        self._ret_neg += r_neg_sq - np.minimum(old, 0.0) ** 2
        self._ret_ring[:, :, p] = r
        n = np.minimum(self._ret_n + 1, W, out=self._ret_n)  # counts are whole numbers <= W
        self._ret_pos = (p + 1) % W
        if self._ret_pos == 0:  # once per window: exact sums from the ring (no drift)
            ring = self._ret_ring
            np.sum(ring, axis=-1, out=self._ret_sum)
            np.sum(ring * ring, axis=-1, out=self._ret_sq)
            np.sum(np.minimum(ring, 0.0) ** 2, axis=-1, out=self._ret_neg)
        mean = self._ret_sum / n
        std = np.sqrt(np.maximum(self._ret_sq / n - mean * mean, 0.0))
        down = np.sqrt(np.maximum(self._ret_neg / n, 0.0))
        enough = n >= self.config.risk_min_count
        self.sharpe.fill(0.0)
        np.divide(mean, np.maximum(std, RISK_STD_FLOOR), out=self.sharpe, where=enough)
        np.clip(self.sharpe, -RISK_RATIO_CLIP, RISK_RATIO_CLIP, out=self.sharpe)
        self.sortino.fill(0.0)
        np.divide(mean, np.maximum(down, RISK_STD_FLOOR), out=self.sortino, where=enough)
        np.clip(self.sortino, -RISK_RATIO_CLIP, RISK_RATIO_CLIP, out=self.sortino)

    def _episode_stats(self, done: np.ndarray) -> dict[str, np.ndarray]:
        """Per-slot statistics of the episodes that end now (valid where done)."""
        ep = self._ep
        acc = {k: self._acc_to_slot(v) for k, v in self._ep_acc.items()}
        n = np.maximum(acc["n"], 1.0)
        mean = acc["sum"] / n
        std = np.sqrt(np.maximum(acc["sq"] / n - mean * mean, 0.0))
        down = np.sqrt(acc["neg"] / n)
        ann = np.sqrt(self.bars_per_year)
        length = np.maximum(ep["length"], 1.0)
        E, S = done.shape
        pc = self._ep_policy_counts.reshape(E, S, NUM_ACTIONS)
        xc = self._ep_exec_counts.reshape(E, S, NUM_ACTIONS)
        trips, won = ep["round_trips"], ep["winning_trips"]
        equity = self._acc_to_slot(self.equity)
        return {
            "return": equity / self.capital - 1.0,
            "length": ep["length"].copy(),
            "reward": ep["reward"].copy(),
            "sharpe": np.divide(mean, std, out=np.zeros_like(mean), where=std > RISK_STD_FLOOR) * ann,
            "sortino": np.divide(mean, down, out=np.zeros_like(mean), where=down > RISK_STD_FLOOR) * ann,
            "max_drawdown": acc["max_drawdown"].copy(),
            "turnover": ep["turnover"] / self.capital,
            "costs": ep["cost"] / self.capital,
            "trades": ep["trades"].copy(),
            "round_trips": trips.copy(),
            "win_rate": np.divide(won, trips, out=np.zeros_like(mean), where=trips > 0),
            "liquidations": ep["liquidations"].copy(),
            "unique_actions": (xc > 0).sum(-1).astype(np.float64),
            "policy_action_entropy": entropy_of_counts(pc),
            "executed_action_entropy": entropy_of_counts(xc),
            "voluntary_trade_rate": ep["voluntary_trades"] / length,
            "sanitizer_trade_delta": 100.0 * (ep["policy_trades"] - ep["trades"]) / length,
            "violations": ep["violations"].copy(),
            "masked_attempts": ep["masked_attempts"].copy(),
            "forced_holds": ep["forced_holds"].copy(),
            "diversity_bonus": ep["diversity_bonus"] / length,
            "order_cancelled": ep["order_cancelled"].copy(),
            "order_shrunk": ep["order_shrunk"].copy(),
            "action_counts": xc.copy(),
            "done_mask": done.copy(),
        }

    # ------------------------------------------------------------------ state for checkpoints and pickling
    # Attributes that are not the core's state: fixed at construction (market tables, sizes, config, constants),
    # scratch buffers rewritten before they are read, and the views below. Everything else in vars(core) is state.
    _FIXED = (
        "config", "symbols", "mode", "split", "sequential", "num_envs", "num_symbols", "accounts_per_env",
        "symbols_per_account", "bars_per_year", "capital", "commission", "min_notional", "lookback", "shaper", "T",
        "_valuation_close", "_fill_ok", "_fill_px", "_decide_ok", "_dollar_vol", "_flat_slip", "_volume_free",
        "_delist_bar", "_vol", "_mean_close", "_tech_rows", "_tech_base", "_sl", "_regime", "split_start",
        "split_last", "observation_shapes", "_rows", "_no_episode", "final_obs", "_tech_idx", "_components",
    )  # fmt: skip

    # Views of the state's arrays and values derived from it, rebuilt by _rebuild_views (pickle would store a view
    # as an unrelated copy): the (E, A, K, 8) view of obs["portfolio"] and the directive-derived mask thresholds.
    _VIEWS = (
        "_portfolio_by_account", "_m_buy_cash", "_m_buy_ok", "_m_add_cash", "_m_cap", "_m_ceiling", "_m_limit",
        "_m_add_ok",
    )  # fmt: skip

    def _rebuild_views(self) -> None:
        self._portfolio_by_account = self.obs["portfolio"].reshape(
            self.num_envs, self.accounts_per_env, self.symbols_per_account, 8
        )
        self._directive_constants()

    def get_state(self) -> dict:
        """Copies of everything that changes as the core runs: numpy arrays, dicts of arrays, Python scalars and the
        generator's state (a dict of ints). `set_state` on a core built with the same arguments continues exactly
        where this one is; `experiment.save_checkpoint` can store the dict (arrays become tensors)."""
        state = {}
        for k, v in vars(self).items():
            if k in self._FIXED or k in self._VIEWS:
                continue
            if isinstance(v, np.ndarray):
                state[k] = v.copy()
            elif isinstance(v, dict):
                state[k] = {name: x.copy() for name, x in v.items()}
            elif isinstance(v, np.random.Generator):
                state[k] = v.bit_generator.state
            elif isinstance(v, bool | int | float):
                state[k] = v
            else:
                raise TypeError(
                    f"VecTradingCore.get_state: attribute {k} ({type(v).__name__}) is neither state nor listed in "
                    "_FIXED / _VIEWS; classify it there."
                )
        return state

    def set_state(self, state: dict) -> None:
        """Continue from a `get_state()` dict (its arrays may be torch tensors, as a loaded checkpoint holds them).
        Arrays are copied into the core's own buffers in place, so the observation dict the caller holds and the
        core's views of its buffers stay valid; the directive-derived mask thresholds are recomputed."""
        own = {k: v for k, v in vars(self).items() if k not in self._FIXED and k not in self._VIEWS}
        if set(state) != set(own):
            raise ValueError(
                f"VecTradingCore.set_state: the state's keys differ from this core's (missing "
                f"{sorted(set(own) - set(state))}, unexpected {sorted(set(state) - set(own))}); it was saved by "
                "another version of trading_env.py."
            )
        for k, cur in own.items():
            if isinstance(cur, np.random.Generator):
                cur.bit_generator.state = state[k]
            elif isinstance(cur, np.ndarray):
                self._copy_into(k, cur, state[k])
            elif isinstance(cur, dict):
                for name, x in cur.items():
                    self._copy_into(f"{k}[{name!r}]", x, state[k][name])
            else:
                setattr(self, k, type(cur)(state[k]))
        self._rebuild_views()

    @staticmethod
    def _copy_into(name: str, dst: np.ndarray, src) -> None:
        src = np.asarray(src)
        if src.shape != dst.shape:
            raise ValueError(
                f"VecTradingCore.set_state: {name} has shape {src.shape} in the state but {dst.shape} here; build the "
                "core with the state's num_envs, symbols and mode."
            )
        np.copyto(dst, src)

    def __getstate__(self) -> dict:
        """Pickling: everything but the views, which __setstate__ rebuilds on the unpickled arrays."""
        return {k: v for k, v in vars(self).items() if k not in self._VIEWS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._rebuild_views()

    def recent_return(self, bars: int) -> np.ndarray:
        """(E, A) sum of each account's last `bars` bar returns (at most risk_window; 0 for bars before the episode
        began): the book's recent PnL as a fraction of its equity, known at the current bar."""
        W = self.config.risk_window
        if not 1 <= bars <= W:
            raise ValueError(f"recent_return: bars must lie in [1, risk_window = {W}], got {bars}.")
        last = (self._ret_pos - 1 - np.arange(bars)) % W  # ring positions of the last `bars` returns
        return self._ret_ring[:, :, last].sum(-1)

    # ------------------------------------------------------------------ centralised critic
    @property
    def state_dim(self) -> int:
        return 8 + self._regime.shape[1] + 4 + 2 * self.num_symbols

    def state(self, obs: dict | None = None) -> np.ndarray:
        """Global state (E, state_dim) float32 for a centralised critic: account features (8, averaged over the
        env's accounts), regime (10), directives (4; zeros in independent mode), then per symbol the position size
        fraction (S) and unrealised PnL (S). It reads only observation arrays: `obs` (default: the current
        observation) may be another observation dict of this core, such as info["final_obs"]."""
        o = self.obs if obs is None else obs
        parts = [o["portfolio"].mean(1), o["regime"][:, 0]]
        parts.append(o["directives"][:, 0] if self.mode == "portfolio" else np.zeros((self.num_envs, 4), np.float32))
        parts += [o["position"][..., 1], o["position"][..., 2]]
        return np.concatenate(parts, axis=1).astype(np.float32)


_BUY_FRACTION = np.array([0.0, *BUY_SIZES, 0.0, 0.0, ADD_SIZE])  # by action id
_SELL_FRACTION = np.array([0.0, 0.0, 0.0, 0.0, SELL_PARTIAL_FRACTION, 1.0, 0.0])


# ---------------------------------------------------------------------------------------------------------------------
# Faces
# ---------------------------------------------------------------------------------------------------------------------
def slot_observation_space(core: VecTradingCore) -> spaces.Dict:
    """The observation space of one slot of `core`: every key bounded (technical by the largest normalised feature
    value of the market, at least OBS_CLIP; position, portfolio and regime by OBS_CLIP; directives by their grid)."""
    tech = np.float32(max(OBS_CLIP, float(np.abs(core._tech_rows).max())))
    bounds = {"action_mask": (0, 1), "sl_probs": (0.0, 1.0), "technical": (-tech, tech), "directives": (-1.0, 1.25)}
    boxes = {}
    for k, shape in core.observation_shapes.items():
        lo, hi = bounds.get(k, (-OBS_CLIP, OBS_CLIP))
        boxes[k] = spaces.Box(lo, hi, shape, dtype=np.int8 if k == "action_mask" else np.float32)
    return spaces.Dict(boxes)


_SCALAR_INFO = (
    "policy_action", "executed_action", "masked_attempt", "forced_hold", "voluntary_trade", "violations",
    "liquidation", "order_cancelled", "order_shrunk", "traded_shares", "fill_price", "cost", "equity", "exposure",
    "cash", "holdings", "round_trip_closed", "round_trip_won", "diversity_bonus", "unique_classes",
)  # fmt: skip


class TradingEnvironment(gym.Env):
    """One symbol, one account: a gymnasium view of a VecTradingCore with E = S = 1 (see its docstring for the
    observation, actions, masks, costs and reward). No autoreset: after terminated or truncated, call reset().
    Observations and info are fresh: info holds the core's per-step telemetry as Python scalars, and at the end of
    an episode info["episode_stats"] (the core's info["episode"] for this slot).
    `action_masks()` returns the current mask as bool (7,) for sb3-contrib's MaskablePPO."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        market: PreparedMarket,
        symbol=0,
        split: str = "train",
        config: EnvConfig | None = None,
        seed: int = 0,
        sequential: bool = False,
    ):
        self.core = VecTradingCore(market, 1, split, "independent", config, seed, sequential, symbols=[symbol])
        self.observation_space = slot_observation_space(self.core)
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        self._action = np.zeros((1, 1), dtype=np.int64)
        self._needs_reset = True
        # (E, S) = (1, 1): views of the core's observation buffers (rewritten in place, never rebound) for _copy
        self._obs_views = {k: v[0, 0] for k, v in self.core.obs.items()}
        self._final_views = {k: v[0, 0] for k, v in self.core.final_obs.items()}

    @staticmethod
    def _copy(views: dict) -> dict:
        return {k: v.copy() for k, v in views.items()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.core.reset(seed=seed)
        self._needs_reset = False
        return self._copy(self._obs_views), {}

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("TradingEnvironment.step() after the episode ended (or before reset): call reset().")
        if not isinstance(action, (int, np.integer)) and not (isinstance(action, np.ndarray) and action.ndim == 0):
            raise TypeError(f"action must be one integer in [0, 6], got {type(action).__name__} {action!r}.")
        self._action[0, 0] = int(action)
        if not 0 <= self._action[0, 0] < NUM_ACTIONS:
            raise ValueError(f"action must lie in [0, {NUM_ACTIONS - 1}], got {int(action)}.")
        _, reward, terminated, truncated, info = self.core.step(self._action)
        term, trunc = terminated.item(), truncated.item()  # (1, 1) arrays -> Python scalars in one call each
        out = {k: info[k].item() for k in _SCALAR_INFO}
        # the components (10, 1, 1) float32 -> 10 Python floats at once (as float(v[0, 0]) each)
        out["reward_components"] = dict(zip(REWARD_COMPONENTS, self.core._components.reshape(-1).tolist(), strict=True))
        views = self._obs_views
        if term or trunc:
            self._needs_reset = True
            views = self._final_views
            # "episode_stats", not "episode": SB3's Monitor convention reserves info["episode"] for {"r", "l", "t"}
            out["episode_stats"] = {k: v.item() for k, v in info["episode"].items() if v.ndim == 2}
        return self._copy(views), reward.item(), term, trunc, out

    def action_masks(self) -> np.ndarray:
        return self.core.obs["action_mask"][0, 0].astype(bool)


class TradingVectorEnv(gym.vector.VectorEnv):
    """gymnasium VectorEnv over all E * S slots of one core (sub-env i = env i // S, symbol i % S), following
    gymnasium 1.x: same-step autoreset (declared in metadata), so where terminated | truncated the returned
    observation starts the next episode; then info["final_obs"] (batched dict) holds the ended episode's last
    observation and info["final_info"] its statistics (the core's episode stats), valid where info["_final_obs"] /
    info["_final_info"]. Every per-slot info array comes with its "_key" mask. Returned arrays are the caller's to
    keep (copies). `action_masks()` gives (E * S, 7) bool. gymnasium.wrappers.vector.RecordEpisodeStatistics works
    on it (info["episode"] is left to it)."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(
        self,
        market: PreparedMarket,
        num_envs: int = 1,
        split: str = "train",
        mode: str = "independent",
        config: EnvConfig | None = None,
        seed: int = 0,
        sequential: bool = False,
        symbols=None,
    ):
        self.core = VecTradingCore(market, num_envs, split, mode, config, seed, sequential, symbols)
        self.num_envs = self.core.num_envs * self.core.num_symbols
        self.single_observation_space = slot_observation_space(self.core)
        self.single_action_space = spaces.Discrete(NUM_ACTIONS)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)

    def _flat(self, obs: dict) -> dict:
        return {k: v.reshape(self.num_envs, *v.shape[2:]).copy() for k, v in obs.items()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        return self._flat(self.core.reset(seed=seed)), {}

    def step(self, actions):
        a = np.asarray(actions)
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},) (one per sub-env), got {a.shape}.")
        obs, reward, terminated, truncated, info = self.core.step(a.reshape(self.core.num_envs, -1))
        n = self.num_envs
        every = np.ones(n, dtype=bool)
        out = {}
        for k, v in info.items():
            if isinstance(v, np.ndarray) and v.ndim >= 2 and k != "done_mask":
                out[k], out[f"_{k}"] = v.reshape(n, *v.shape[2:]).copy(), every
        out["reward_components"] = {k: v.reshape(n).copy() for k, v in info["reward_components"].items()}
        out["_reward_components"] = every
        done = info["done_mask"].reshape(n).copy()
        if done.any():
            out["final_obs"], out["_final_obs"] = self._flat(info["final_obs"]), done
            stats = {k: v.reshape(n, *v.shape[2:]).copy() for k, v in info["episode"].items() if k != "done_mask"}
            out["final_info"], out["_final_info"] = stats, done
        return self._flat(obs), reward.reshape(n).copy(), terminated.reshape(n).copy(), truncated.reshape(n).copy(), out

    def action_masks(self) -> np.ndarray:
        return self.core.obs["action_mask"].reshape(self.num_envs, NUM_ACTIONS).astype(bool)


try:  # Stable-Baselines3 is optional (a test requirement): without it the SB3 face is not defined
    from stable_baselines3.common.vec_env import VecEnv as _SB3VecEnv
except ImportError:  # pragma: no cover
    _SB3VecEnv = None

if _SB3VecEnv is not None:

    class SB3VecEnv(_SB3VecEnv):
        """Stable-Baselines3 VecEnv over all E * S slots of one core (sub-env i = env i // S, symbol i % S): SB3's
        algorithms step the whole core at once instead of one gymnasium env per slot. SB3 conventions: dones =
        terminated | truncated, info["terminal_observation"] and info["TimeLimit.truncated"] at an episode's end,
        info["episode"] = {"r", "l", "t"} for SB3's episode logging, info["episode_stats"] the core's statistics.
        `env_method("action_masks")` returns every slot's mask, so sb3-contrib's MaskablePPO trains on it."""

        def __init__(
            self,
            market: PreparedMarket,
            num_envs: int = 1,
            split: str = "train",
            config: EnvConfig | None = None,
            seed: int = 0,
            symbols=None,
        ):
            self.core = VecTradingCore(market, num_envs, split, "independent", config, seed, symbols=symbols)
            num_slots = self.core.num_envs * self.core.num_symbols
            self.render_mode = None  # the slots do not render; SB3's VecEnv reads it through get_attr
            super().__init__(num_slots, slot_observation_space(self.core), spaces.Discrete(NUM_ACTIONS))
            self._actions = np.zeros(self.num_envs, dtype=np.int64)
            self._returns = np.zeros(self.num_envs)
            self._started = time.perf_counter()

        def _flat(self, obs: dict) -> dict:
            return {k: v.reshape(self.num_envs, *v.shape[2:]).copy() for k, v in obs.items()}

        def reset(self):
            seed = self._seeds[0] if any(s is not None for s in self._seeds) else None
            self._reset_seeds()
            self._returns[:] = 0.0
            return self._flat(self.core.reset(seed=seed))

        def step_async(self, actions) -> None:
            self._actions = np.asarray(actions, dtype=np.int64).reshape(self.core.num_envs, -1)

        def step_wait(self):
            obs, reward, terminated, truncated, info = self.core.step(self._actions)
            n = self.num_envs
            reward, terminated, truncated = reward.reshape(n), terminated.reshape(n), truncated.reshape(n)
            dones = terminated | truncated
            self._returns += reward
            infos = [{} for _ in range(n)]
            if dones.any():
                final = self._flat(info["final_obs"])
                stats = {k: v.reshape(n) for k, v in info["episode"].items() if v.ndim == 2}
                length = stats["length"]
                for i in np.flatnonzero(dones):
                    infos[i] = {
                        "terminal_observation": {k: v[i] for k, v in final.items()},
                        "TimeLimit.truncated": bool(truncated[i]),
                        "episode": {
                            "r": float(self._returns[i]),
                            "l": int(length[i]),
                            "t": round(time.perf_counter() - self._started, 6),
                        },
                        "episode_stats": {k: float(v[i]) for k, v in stats.items()},
                    }
                self._returns[dones] = 0.0
            return self._flat(obs), reward.astype(np.float32), dones, infos

        def action_masks(self) -> np.ndarray:
            return self.core.obs["action_mask"].reshape(self.num_envs, NUM_ACTIONS).astype(bool)

        def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list:
            if method_name != "action_masks":
                raise AttributeError(f"SB3VecEnv has no per-slot method {method_name!r}; only action_masks.")
            masks = self.action_masks()
            return [masks[i] for i in self._get_indices(indices)]

        def get_attr(self, attr_name: str, indices=None) -> list:
            return [getattr(self, attr_name) for _ in self._get_indices(indices)]

        def set_attr(self, attr_name: str, value, indices=None) -> None:
            setattr(self, attr_name, value)

        def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
            return [False for _ in self._get_indices(indices)]

        def close(self) -> None:
            pass


def _make_trading_env(market: PreparedMarket | None = None, data=None, **kwargs) -> TradingEnvironment:
    """gymnasium.make("TradingEnv-v0", ...): TradingEnvironment on `market`, or on the market of a DataConfig
    `data` (default: the embedded synthetic market), prepared and cached by market_data.prepare_market."""
    if market is None:
        from market_data import DataConfig, prepare_market

        market = prepare_market(data if data is not None else DataConfig())
    return TradingEnvironment(market, **kwargs)


if "TradingEnv-v0" not in gym.registry:
    gym.register(id="TradingEnv-v0", entry_point=_make_trading_env)


try:
    from pettingzoo import ParallelEnv
except ImportError:  # pettingzoo is in requirements.txt; only the portfolio face needs it
    ParallelEnv = object


class PortfolioParallelEnv(ParallelEnv):
    """PettingZoo ParallelEnv over one portfolio-mode account: agents are the symbol names, each observes its slot
    (with `directives`) and picks Discrete(7). `state()` is the global state for a centralised critic
    (VecTradingCore.state). The master sets directives with `set_directive(index)` (an int in [0, 60)). When the
    account terminates or the episode is truncated, every agent is done together and `agents` becomes empty."""

    metadata = {"name": "portfolio_trading_v0", "render_modes": []}

    def __init__(
        self,
        market: PreparedMarket,
        split: str = "train",
        config: EnvConfig | None = None,
        seed: int = 0,
        sequential: bool = False,
        symbols=None,
    ):
        self.core = VecTradingCore(market, 1, split, "portfolio", config, seed, sequential, symbols)
        self.possible_agents = list(self.core.symbols)
        self.agents = []
        self._space = slot_observation_space(self.core)
        self._action_space = spaces.Discrete(NUM_ACTIONS)
        self.state_space = spaces.Box(-np.inf, np.inf, (self.core.state_dim,), dtype=np.float32)
        self._actions = np.zeros((1, self.core.num_symbols), dtype=np.int64)

    def observation_space(self, agent):
        return self._space

    def action_space(self, agent):
        return self._action_space

    def _split(self, obs: dict) -> dict:
        return {a: {k: v[0, i].copy() for k, v in obs.items()} for i, a in enumerate(self.possible_agents)}

    def reset(self, seed: int | None = None, options: dict | None = None):
        obs = self.core.reset(seed=seed)
        self.agents = list(self.possible_agents)
        return self._split(obs), {a: {} for a in self.agents}

    def set_directive(self, index: int) -> None:
        self.core.set_directives(np.array([int(index)]))

    def step(self, actions: dict):
        if not self.agents:
            raise RuntimeError("PortfolioParallelEnv.step() after the episode ended (or before reset): call reset().")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"actions has no entry for agents {missing[:5]}: pass one action per agent.")
        self._actions[0] = [int(actions[a]) for a in self.possible_agents]
        obs, reward, terminated, truncated, info = self.core.step(self._actions)
        if info["done_mask"].any():
            obs = info["final_obs"]
            self.agents = []
        names = self.possible_agents
        executed, cost = info["executed_action"][0], info["cost"][0]
        infos = {a: {"executed_action": int(executed[i]), "cost": float(cost[i])} for i, a in enumerate(names)}
        return (
            self._split(obs),
            {a: float(reward[0, i]) for i, a in enumerate(names)},
            {a: bool(terminated[0, i]) for i, a in enumerate(names)},
            {a: bool(truncated[0, i]) for i, a in enumerate(names)},
            infos,
        )

    def state(self) -> np.ndarray:
        return self.core.state()[0]


# ---------------------------------------------------------------------------------------------------------------------
# Rollout telemetry: the tensorboard scalars of DESIGN section 3, from the core's per-step info (shared by the scripts)
# ---------------------------------------------------------------------------------------------------------------------
TELEMETRY_KEYS = ("masked_attempt", "forced_hold", "voluntary_trade", "violations", "diversity_bonus", "cost")
TELEMETRY_KEYS += ("equity", "exposure")


def add_step_telemetry(tele: dict, episodes: dict, info: dict, steps: int) -> None:
    """Accumulate one step's info over a rollout of `steps` steps: the rollout means of the TELEMETRY_KEYS arrays and
    of the reward components (as "reward/<name>") into tele, the statistics of the episodes that ended at this step
    into episodes (a list per key)."""
    for k in TELEMETRY_KEYS:
        tele[k] = tele.get(k, 0.0) + float(np.mean(info[k])) / steps
    for k, v in info["reward_components"].items():
        tele[f"reward/{k}"] = tele.get(f"reward/{k}", 0.0) + float(np.mean(v)) / steps
    done_mask = info["episode"]["done_mask"]
    if done_mask.any():
        for k, v in info["episode"].items():
            if k not in ("done_mask", "action_counts"):
                episodes.setdefault(k, []).extend(np.asarray(v)[done_mask].tolist())


def telemetry_metrics(tele: dict, policy_actions: np.ndarray, executed_actions: np.ndarray, masks: np.ndarray) -> dict:
    """Tensorboard scalars of one rollout from add_step_telemetry's `tele`, the (T, E, S) policy and executed actions
    and the (T, E, S, 7) action masks. The action entropies are normalised (slot_action_entropy with masks: 1 =
    uniform over the allowed actions). Trade rates are fractions of slot-steps; the sanitizer trade delta (policy
    minus executed trade rate) is in percentage points, as DESIGN.md and validate_stage5.py read it."""
    policy_trades, executed_trades = (policy_actions != HOLD).mean(), (executed_actions != HOLD).mean()
    h_policy, h_exec = slot_action_entropy(policy_actions, masks), slot_action_entropy(executed_actions, masks)
    metrics = {
        "charts/policy_action_entropy_mean": float(np.nanmean(h_policy)) if np.isfinite(h_policy).any() else 0.0,
        "charts/executed_action_entropy_mean": float(np.nanmean(h_exec)) if np.isfinite(h_exec).any() else 0.0,
        "charts/executed_vs_policy_trades": executed_trades / policy_trades if policy_trades > 0 else 1.0,
        "charts/sanitizer_trade_delta": 100.0 * (policy_trades - executed_trades),
        "charts/voluntary_trade_rate": tele["voluntary_trade"],
        "charts/consecutive_action_violations": tele["violations"],
        "charts/diversity_bonus": tele["diversity_bonus"],
        "charts/masked_attempt_rate": tele["masked_attempt"],
        "charts/forced_hold_rate": tele["forced_hold"],
        "trading/equity": tele["equity"],
        "trading/exposure": tele["exposure"],
        "trading/cost_per_step": tele["cost"],
        "trading/policy_trade_rate": float(policy_trades),
        "trading/executed_trade_rate": float(executed_trades),
    }
    for a, name in enumerate(ACTION_NAMES):
        metrics[f"charts/action_distribution/{name}"] = float((executed_actions == a).mean())
        metrics[f"charts/policy_action_distribution/{name}"] = float((policy_actions == a).mean())
    metrics.update({k: v for k, v in tele.items() if k.startswith("reward/")})
    return metrics
