"""The judge beside the world: backtests of a policy on a split, their metrics, the baselines on the same capital and
costs, the rule ceiling, the master's baselines and go criterion, the report and the pictures.

Layout of this file: metrics (daily returns, Sharpe with its robust error, PSR / DSR) -> run_backtest (one sequential
sweep of a split with trading_env's VecTradingCore) -> symbol-agent baselines and the rule ceiling -> stress tests ->
the master's baselines: sweep_backtests (many masters in one lockstep sweep), the constant directives, threshold
rules on the cross-section and the volatility target fitted on train, the oracle ceiling on the hidden edge state,
master_backtests, the go criterion with its paired Sharpe margin, the directive analysis -> the report (stdout, JSON,
Markdown, parquet) -> pictures -> walk-forward stitching -> explanations (--explain: integrated-gradients saliency of
the chosen action, the agent's direction against the supervised prior's).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from market_data import REGIME_NAMES_SYNTH, PreparedMarket, downturn_warning
from trading_env import (
    ACTION_NAMES,
    BUY_LARGE,
    DIRECTIVE_SHAPE,
    HOLD,
    INCREASE_ACTIONS,
    NEUTRAL_DIRECTIVE,
    NUM_DIRECTIVES,
    REGIME_MODES,
    RISK_MULTIPLIERS,
    SELL_ALL,
    SELL_PARTIAL,
    EnvConfig,
    VecTradingCore,
)


# ---------------------------------------------------------------------------------------------------------------------
# Backtest: one sequential sweep of a split, its metrics, the baselines on the same capital and costs, the rule ceiling
# ---------------------------------------------------------------------------------------------------------------------
def daily_returns(equity: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equity marks (N+1,) at timestamps (N+1,) -> (dates (D,) datetime64[D], simple returns (D,)) from one UTC
    calendar day's last mark to the next day's; the first day's return runs from the initial mark. Intraday bars are
    compounded into their day, so hourly, daily and 24/7 data all give one return per session or calendar day."""
    equity = np.asarray(equity, dtype=np.float64)
    day = np.asarray(timestamps).astype("datetime64[D]")
    ends = np.flatnonzero(np.r_[day[1:] != day[:-1], True])  # (D,) the last mark of each day
    if ends[0] == 0:  # the first day holds only the initial mark: no return on it
        ends = ends[1:]
    marks = np.r_[equity[0], equity[ends]]
    return day[ends], marks[1:] / marks[:-1] - 1.0


def sharpe_hac_se(r: np.ndarray, lags: int | None = None) -> float:
    """Autocorrelation-robust standard error of the per-period Sharpe ratio mean(r) / std(r): the delta method on the
    moments (r - mu, (r - mu)^2 - var) with a Newey-West (Bartlett) long-run covariance, Lo (2002) section 3 with
    Newey and West (1987); `lags` defaults to floor(4 (n / 100)^(2/9)). For independent normal returns it reduces to
    Lo's sqrt((1 + SR^2 / 2) / n)."""
    r = np.asarray(r, dtype=np.float64)
    n = len(r)
    sd = r.std()
    if n < 3 or sd < 1e-15:
        return float("nan")
    mu = r.mean()
    u = np.stack([r - mu, (r - mu) ** 2 - sd**2], axis=1)  # (n, 2)
    lags = int(4 * (n / 100) ** (2 / 9)) if lags is None else lags
    cov = u.T @ u / n
    for lag in range(1, min(lags, n - 1) + 1):
        gamma = u[lag:].T @ u[:-lag] / n
        cov += (1.0 - lag / (lags + 1)) * (gamma + gamma.T)
    grad = np.array([1.0 / sd, -mu / (2.0 * sd**3)])
    return float(np.sqrt(max(grad @ cov @ grad, 0.0) / n))


def probabilistic_sharpe(r: np.ndarray, benchmark: float = 0.0) -> float | None:
    """P(true per-period Sharpe > benchmark) given the sample's Sharpe, skewness and kurtosis (Bailey and Lopez de
    Prado 2012, eq. 5): Phi((SR - SR*) sqrt(n - 1) / sqrt(1 - skew SR + (kurt - 1) / 4 SR^2)). None without risk."""
    r = np.asarray(r, dtype=np.float64)
    n, sd = len(r), r.std()
    if n < 3 or sd < 1e-15:
        return None
    sr = r.mean() / sd
    z = (r - r.mean()) / sd
    skew, kurt = float(np.mean(z**3)), float(np.mean(z**4))
    denom = 1.0 - skew * sr + (kurt - 1.0) / 4.0 * sr**2
    return float(NormalDist().cdf((sr - benchmark) * np.sqrt(n - 1) / np.sqrt(max(denom, 1e-12))))


def expected_max_sharpe(trial_sharpes, trials: int | None = None) -> float:
    """The Sharpe that the best of N unskilled trials is expected to reach (Bailey and Lopez de Prado 2014, the
    deflated Sharpe's SR_0): sqrt(V[SR]) ((1 - g) Phi^-1(1 - 1/N) + g Phi^-1(1 - 1/(N e))), g the Euler-Mascheroni
    constant, V[SR] the variance of the trials' Sharpes (in the same units as the result). 0 for one trial."""
    trial_sharpes = np.asarray(trial_sharpes, dtype=np.float64)
    n = len(trial_sharpes) if trials is None else trials
    if n < 2 or len(trial_sharpes) < 2:
        return 0.0
    g, inv = 0.5772156649015329, NormalDist().inv_cdf
    return float(trial_sharpes.std(ddof=1) * ((1 - g) * inv(1 - 1 / n) + g * inv(1 - 1 / (n * np.e))))


def performance_metrics(equity: np.ndarray, timestamps: np.ndarray, bars_per_year: float, bars_per_day: float) -> dict:
    """Equity curve (N+1,) that starts at the initial capital, marked at timestamps (N+1,) -> return, risk and
    drawdown metrics.

    Sharpe and Sortino come from daily returns (daily_returns: intraday bars compounded per calendar day),
    annualised with sqrt(days a year = bars_per_year / bars_per_day), risk-free rate 0: an intraday strategy's bar
    returns are autocorrelated, and sqrt(bars a year) x the per-bar Sharpe overstates it. sharpe_se is the
    autocorrelation-robust (Newey-West) standard error of the daily Sharpe, annualised the same way; psr the
    probabilistic Sharpe ratio P(Sharpe > 0). sharpe_bar keeps the per-bar figure (sqrt(bars a year) x mean / std of
    bar returns) beside bar_autocorr, the lag-1 autocorrelation of the bar returns that inflates it. CAGR uses
    N / bars_per_year years; the drawdown duration is the longest stretch of bars below a previous peak.
    """
    equity = np.asarray(equity, dtype=np.float64)
    r = equity[1:] / equity[:-1] - 1.0
    _, daily = daily_returns(equity, timestamps)
    growth = equity[-1] / equity[0]
    n = len(r)
    years = max(n / bars_per_year, 1e-12)
    ann_day, ann_bar = np.sqrt(bars_per_year / bars_per_day), np.sqrt(bars_per_year)
    day_sd = daily.std(ddof=1) if len(daily) > 1 else 0.0
    bar_sd = r.std(ddof=1) if n > 1 else 0.0
    downside = np.sqrt(np.mean(np.minimum(daily, 0.0) ** 2)) if len(daily) else 0.0
    drawdown = equity / np.maximum.accumulate(equity) - 1.0
    edges = np.flatnonzero(np.diff(np.r_[0, (drawdown < 0).astype(np.int8), 0]))  # starts and ends of drawdowns
    cagr = growth ** (1.0 / years) - 1.0 if growth > 0 else -1.0
    max_dd = float(drawdown.min())
    se = sharpe_hac_se(daily)
    return {
        "total_return": float(growth - 1.0),
        "cagr": float(cagr),
        "sharpe": float(daily.mean() / day_sd * ann_day) if day_sd > 1e-15 else 0.0,
        "sharpe_se": float(se * ann_day) if np.isfinite(se) else None,
        "psr": probabilistic_sharpe(daily),
        "sortino": float(daily.mean() / downside * ann_day) if downside > 1e-15 else 0.0,
        "sharpe_bar": float(r.mean() / bar_sd * ann_bar) if bar_sd > 1e-15 else 0.0,
        "bar_autocorr": float(np.corrcoef(r[1:], r[:-1])[0, 1]) if n > 2 and r[1:].std() * r[:-1].std() > 0 else None,
        "max_drawdown": max_dd,
        "max_drawdown_bars": int((edges[1::2] - edges[::2]).max()) if len(edges) else 0,
        "calmar": float(cagr / abs(max_dd)) if max_dd < 0 else None,
        "bars": n,
        "days": len(daily),
        "days_per_year": float(bars_per_year / bars_per_day),
    }


def run_backtest(
    policy,
    market: PreparedMarket,
    split: str,
    config: EnvConfig,
    seed: int,
    mode: str = "independent",
    master=None,
    interval: int = 1,
    symbols=None,
) -> dict:
    """One sequential sweep of `split` with one env trading every symbol; policy(obs) -> actions (1, S) each bar.
    Every bar of the split after the lookback is stepped exactly once (a stopped-out account stays flat with its cash
    until the end), so the sweep always ends.

    independent mode: the S accounts form one equal-capital book (S x initial capital); portfolio mode: one account.
    master(obs, core, last_policy_actions) -> (1,) directive index is called every `interval` bars (none: the
    neutral directive throughout). Returns {"agent": metrics, "curve": book equity (N+1,), "series": per-bar arrays
    (timestamps (N+1,), exposure (N,), and per bar and symbol (N, S): PnL, executed actions, holdings' value, filled
    shares (negative: sold), fill prices and costs; directives)}. The metrics
    are performance_metrics plus exposure (mean holdings / equity), trades (filled orders), orders cancelled and
    shrunk, round trips and win rate (share of round trips with a positive realised PnL net of all their costs),
    stop-out and delisting liquidations, annualised turnover (traded notional over the mean book equity), costs and,
    with `master`, the directives' usage."""
    if master is not None and mode != "portfolio":
        raise ValueError(
            "run_backtest: a master (a directive chooser) needs mode='portfolio' (no directives otherwise)."
        )
    core = VecTradingCore(market, 1, split=split, mode=mode, config=config, seed=seed, sequential=True, symbols=symbols)
    obs = core.reset(seed=seed)
    start, n, S = int(core.t[0]), int(core.end[0] - core.t[0]), core.num_symbols
    A, K = core.accounts_per_env, core.symbols_per_account  # (S, 1) in independent mode, (1, S) in portfolio mode
    book = float(config.initial_capital) * A
    equity, exposure = np.empty(n + 1), np.empty(n)
    equity[0] = book
    pnl, executed, used = np.zeros((n, S)), np.zeros((n, S), np.int8), np.zeros(NUM_DIRECTIVES)
    holdings, shares, price, paid = (np.zeros((n, S)) for _ in range(4))  # per bar and symbol: value, fills, costs
    directives = np.full(n, -1, dtype=np.int64)
    last_actions = np.zeros((1, S), np.int64)
    counts = dict.fromkeys(("trades", "cancelled", "shrunk", "round_trips", "wins", "liquidations"), 0)
    cost = traded = 0.0
    for i in range(n):
        if master is not None and i % interval == 0:
            index = np.asarray(master(obs, core, last_actions), dtype=np.int64)
            core.set_directives(index)
            used[index[0]] += 1
        if master is not None:
            directives[i] = core.directive_index[0]
        obs, _, terminated, truncated, info = core.step(policy(obs))
        last_actions = info["policy_action"].copy()
        equity[i + 1] = info["equity"][0, ::K].sum()  # the book, before any reset at the sweep's end
        exposure[i] = info["holdings"][0].sum() / equity[i + 1]
        pnl[i], executed[i], holdings[i] = info["pnl"][0], info["executed_action"][0], info["holdings"][0]
        shares[i], price[i], paid[i] = info["traded_shares"][0], info["fill_price"][0], info["cost"][0]
        counts["trades"] += int((info["traded_shares"][0] != 0).sum())  # filled orders
        for key, flag in (
            ("cancelled", "order_cancelled"),
            ("shrunk", "order_shrunk"),
            ("wins", "round_trip_won"),
            ("round_trips", "round_trip_closed"),
            ("liquidations", "liquidation"),
        ):
            counts[key] += int(info[flag][0].sum())
        cost += float(info["cost"][0].sum())
        traded += float((np.abs(info["traded_shares"][0]) * info["fill_price"][0]).sum())
        # the sweep ends on its last bar, by time (truncated) or by a stop-out on that very bar (terminated)
        if truncated.any() != (i == n - 1) and not (i == n - 1 and terminated.any()):
            raise RuntimeError(f"run_backtest: the sweep of {split!r} ended at step {i + 1} of {n}; this is a bug.")
    ppy, timestamps = market.data.bars_per_year, market.data.timestamps[start : start + n + 1]
    metrics = performance_metrics(equity, timestamps, ppy, market.data.bars_per_day)
    metrics.update(
        exposure=float(exposure.mean()),
        trades=counts["trades"],
        trade_rate=counts["trades"] / (n * S),
        orders_cancelled=counts["cancelled"],
        orders_shrunk=counts["shrunk"],
        round_trips=counts["round_trips"],
        win_rate=counts["wins"] / counts["round_trips"] if counts["round_trips"] else None,
        liquidations=counts["liquidations"],
        turnover=traded / float(equity.mean()) * ppy / n,
        costs=cost,
        costs_frac=cost / book,
    )
    if master is not None:
        coords, share = np.unravel_index(np.arange(NUM_DIRECTIVES), DIRECTIVE_SHAPE), used / used.sum()
        metrics.update(
            directive_risk_level=float((share * coords[0]).sum()),
            directive_concentration_level=float((share * coords[1]).sum()),
            directive_regime_level=float((share * coords[2]).sum()),
            directive_most_used=int(used.argmax()),
        )
    series = {
        "timestamps": timestamps,
        "exposure": exposure,
        "pnl": pnl,
        "executed": executed,
        "directives": directives,
        "start": start,
        "interval": interval,
        "holdings": holdings,
        "fills": {"shares": shares, "price": price, "cost": paid},
    }
    return {"agent": metrics, "curve": equity, "series": series}


def hold_policy(obs) -> np.ndarray:
    """Always HOLD: the cash baseline."""
    return np.zeros(obs["action_mask"].shape[:-1], dtype=np.int64)


def random_policy(seed: int, trade_rate: float = 1.0):
    """With probability trade_rate a uniformly random allowed non-HOLD action (Gumbel-max), else HOLD; its own
    generator, so the training RNG is untouched. trade_rate = 1 is uniform over the allowed trades; the baseline
    uses the agent's own trade rate, so that it trades about as often as the agent. Only the rate is matched: its
    order sizes, and so its costs, follow from its random actions (the report shows each strategy's costs)."""
    rng = np.random.default_rng(seed)

    def act(obs):
        mask = obs["action_mask"].astype(bool)
        noise = rng.gumbel(size=mask.shape)
        noise[..., HOLD] = -np.inf
        pick = np.where(mask, noise, -np.inf).argmax(-1)
        trade = (rng.random(pick.shape) < trade_rate) & mask[..., 1:].any(-1)
        return np.where(trade, pick, HOLD)

    return act


def buy_and_hold(
    market: PreparedMarket, start: int, bars: int, book: float, config: EnvConfig, fraction: float = 1.0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Buy-and-hold on the same capital and costs as a backtest from bar `start` over `bars` bars: (equity (bars + 1,),
    exposure (bars,)) of `fraction` x book put in the benchmark and in an investable equal-weight basket (equal
    amounts of every symbol tradable at the first fill, bought at open[start + 1]), the rest held as cash, never
    rebalanced. The entry pays commission + spread; a basket symbol delisted inside the window is sold at its last
    close, paying them again. The benchmark series is treated as an investable index fund bought at its close of
    bar start + 1 (it has no open)."""
    c = (config.commission_bps + config.spread_bps) / 1e4
    stop = start + bars + 1
    bench = market.data.benchmark[start:stop]
    invest = fraction * book
    b_hold = np.r_[0.0, invest * (1.0 - c) * bench[1:] / bench[1]]  # bought at the first fill's close, bench[1]
    b_eq = np.r_[book, book - invest + b_hold[1:]]
    out = {"benchmark": (b_eq, b_hold[1:] / b_eq[1:])}
    first = start + 1
    px = market.data.open if config.fill == "open" else market.data.close
    vol = market.data.volume
    volume_free = ~(np.nan_to_num(vol) > 0).any(0)  # as the core: such symbols trade only under a flat cost model
    has_volume = (vol[first] > 0) | (volume_free & (config.volume_free_cost_bps is not None))
    ok = market.data.tradable[first] & np.isfinite(px[first]) & (px[first] > 0) & has_volume
    value = np.zeros(bars + 1)
    cash = np.full(bars + 1, book)
    if ok.any():
        shares = np.where(ok, invest / ok.sum() * (1.0 - c) / np.where(ok, px[first], 1.0), 0.0)  # (S,)
        vc = market.valuation_close[start:stop]  # (bars + 1, S)
        full = market.data.close
        last = len(full) - 1 - np.argmax(np.isfinite(full[::-1]), axis=0)  # (S,) each symbol's last bar (delisting)
        alive = np.arange(start, stop)[:, None] <= last[None, :]
        held = shares[None, :] * alive
        held[0] = 0.0  # bought at the first fill, after bar `start`
        sold = (shares[None, :] * ~alive) * vc * (1.0 - c)  # a delisted holding turns into cash at its last close
        value = (held * vc).sum(1)
        cash = book - invest + sold.sum(1)
        cash[0] = book
    eq = cash + value
    out["equal_weight"] = (eq, value[1:] / eq[1:])
    return out


def fit_rule(market: PreparedMarket, config: EnvConfig, split: str = "train") -> dict:
    """The best one-feature rule on `split`: hold a long position while direction x technical feature f at the
    decision bar exceeds a threshold (a quantile, 50-95%, of that feature on the split), flat otherwise. Fitted on a
    vectorised proxy of the backtest (the position taken at bar t earns open[t+1] -> open[t+2], and every change pays
    commission + spread), choosing the (feature, direction, threshold) with the best annualised Sharpe of the
    equal-weight book's daily returns (bar returns summed per calendar day of the decision bar, as
    performance_metrics). Its honest figures come from run_backtest(rule_policy(rule), ...) on other splits."""
    lo, hi = market.splits[split]
    t = np.arange(max(lo, market.lookback - 1), hi - 2)
    px = market.data.open if config.fill == "open" else market.data.close
    with np.errstate(invalid="ignore", divide="ignore"):
        ret = px[t + 2] / px[t + 1] - 1.0  # (n, S)
    ok = np.isfinite(ret) & market.data.tradable[t] & market.data.tradable[t + 1]
    ret = np.where(ok, ret, 0.0)
    c = (config.commission_bps + config.spread_bps) / 1e4
    day = market.data.timestamps[t].astype("datetime64[D]")
    day_starts = np.flatnonzero(np.r_[True, day[1:] != day[:-1]])  # (D,) first decision of each day
    ann = np.sqrt(market.data.bars_per_year / market.data.bars_per_day)
    quantiles = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    best = {"sharpe": -np.inf}
    for f, name in enumerate(market.feature_names):
        x = market.technical[t, :, f].astype(np.float64)  # (n, S)
        for direction in (1.0, -1.0):
            v = direction * x
            for q, theta in zip(quantiles, np.quantile(v[ok], quantiles), strict=True):
                pos = (v > theta) & ok
                change = np.abs(np.diff(pos.astype(np.float64), axis=0, prepend=0.0))
                book = (pos * ret - c * change).mean(1)  # (n,) equal-weight book return per bar
                book = np.add.reduceat(book, day_starts)  # (D,) per day
                sd = book.std()
                sharpe = book.mean() / sd * ann if sd > 0 else 0.0
                if sharpe > best["sharpe"]:
                    best = {
                        "sharpe": float(sharpe),
                        "feature": f,
                        "name": name,
                        "direction": direction,
                        "threshold": float(theta),
                        "quantile": float(q),
                        "split": split,
                    }
    best["train_proxy_sharpe"] = best.pop("sharpe")
    return best


def rule_policy(rule: dict):
    """fit_rule's rule as a policy of the env's actions: BUY_LARGE when the rule turns on while flat, SELL_ALL when
    it turns off while holding, HOLD otherwise (masks respected)."""

    def act(obs):
        x = rule["direction"] * obs["technical"][..., -1, rule["feature"]]
        on, mask = x > rule["threshold"], obs["action_mask"].astype(bool)
        holding = obs["position"][..., 4] > 0
        buy = on & ~holding & mask[..., BUY_LARGE]
        sell = ~on & holding & mask[..., SELL_ALL]
        return np.where(buy, BUY_LARGE, np.where(sell, SELL_ALL, HOLD))

    return act


# The lead-lag market's ceiling (--data.lead-lag): a one-line rule across symbols, the yardstick of a graph module.
def fit_cross_rule(market: PreparedMarket, config: EnvConfig, split: str = "train", quantile: float = 0.8) -> dict:
    """The cross rule of the lead-lag market: long a follower for one bar after its leader's ret_1 (the observed,
    normalised technical feature) lies in the leader's top quintile, flat otherwise. Leaders are never held (their own
    window has no edge), and there is no short side (the environment is long only). The rule is given the market's
    hidden leader map (MarketData.leader_map): it knows the structure a learner has to find, and fits only each
    leader's threshold, the `quantile` of its ret_1 over the decision bars of `split` where it is tradable. Also
    reported, as a check that the map can be learnt from `split` alone: map_recovered, the share of followers whose
    best lag-1 predictor on the split (the symbol j != f whose ret_1 at t has the largest correlation with f's
    return over the bar the rule would hold, px[t+1] -> px[t+2]) is their leader. Its honest figures come from
    run_backtest(cross_rule_policy(rule), ...) on other splits. config sets the fill price of that check only."""
    leaders = market.data.leader_map
    if leaders is None:
        raise ValueError("fit_cross_rule needs the lead-lag market (--data.lead-lag): this market has no leader map.")
    leaders = np.asarray(leaders, dtype=np.int64)
    lo, hi = market.splits[split]
    t = np.arange(max(lo, market.lookback - 1), hi - 2)
    feature = market.feature_names.index("ret_1")
    x = market.technical[t, :, feature].astype(np.float64)  # (n, S)
    ok = market.data.tradable[t]  # (n, S) missing bars have ret_1 = 0, not a reading
    thresholds = np.full(len(leaders), np.nan)
    for s in np.unique(leaders):
        thresholds[s] = np.quantile(x[ok[:, s], s], quantile)
    px = market.data.open if config.fill == "open" else market.data.close
    with np.errstate(invalid="ignore", divide="ignore"):
        ret = np.log(px[t + 2] / px[t + 1])  # (n, S) the bar a position taken at t holds
    both = np.isfinite(ret) & ok & market.data.tradable[t + 1]
    z = np.where(ok, x - np.where(ok, x, 0.0).mean(0), 0.0)
    y = np.where(both, ret - np.where(both, ret, 0.0).mean(0), 0.0)
    corr = (z.T @ y) / np.sqrt(np.outer((z**2).sum(0), (y**2).sum(0)))  # (S, S) ret_1 of j at t vs f's next bar
    np.fill_diagonal(corr, -np.inf)
    follow = np.flatnonzero(leaders != np.arange(len(leaders)))
    recovered = corr[:, follow].argmax(0) == leaders[follow]
    return {
        "name": "cross_ret_1",
        "feature": feature,
        "leader_map": leaders.tolist(),
        "thresholds": [None if np.isnan(v) else float(v) for v in thresholds],
        "quantile": float(quantile),
        "split": split,
        "map_recovered": float(recovered.mean()) if len(follow) else None,
    }


def cross_rule_policy(rule: dict):
    """fit_cross_rule's rule as a policy of the env's actions, for an env over the whole universe in its order:
    BUY_LARGE when a follower's leader's ret_1 crosses its threshold while the follower is flat, SELL_ALL when it does
    not while the follower is held, HOLD otherwise and always for leaders (masks respected)."""
    leaders = np.asarray(rule["leader_map"], dtype=np.int64)
    follower = leaders != np.arange(len(leaders))  # (S,)
    threshold = np.array([np.inf if v is None else v for v in rule["thresholds"]])[leaders]  # (S,) the leader's
    trade = rule_policy({"direction": 1.0, "feature": 0, "threshold": threshold})  # its entries and exits

    def act(obs):
        x = obs["technical"][..., -1, rule["feature"]]  # (E, S)
        lead = np.where(follower, x[..., leaders], -np.inf)  # the leader's reading in each follower's slot
        return trade(obs | {"technical": lead[..., None, None]})  # (E, S, 1, 1): rule_policy reads [..., -1, 0]

    return act


def baseline_backtests(
    market: PreparedMarket, split: str, config: EnvConfig, seed: int, agent: dict, rule: dict | None = None
) -> dict[str, dict]:
    """The baselines of an independent-mode agent backtest `agent` (run_backtest's result), each on the same split,
    capital and costs: always-HOLD; random at the agent's trade rate; the rule ceiling (when a fit_rule rule is
    given); buy-and-hold of the benchmark and of the equal-weight basket, at full exposure and scaled to the agent's
    average exposure. Returns name -> {"agent": metrics with exposure, "curve": equity, "series": run_backtest's
    series, or for buy-and-hold only the exposure (N,)}."""
    out = {
        "always_hold": run_backtest(hold_policy, market, split, config, seed),
        "random": run_backtest(random_policy(seed + 1, agent["agent"]["trade_rate"]), market, split, config, seed),
    }
    if rule is not None:
        out["rule_ceiling"] = run_backtest(rule_policy(rule), market, split, config, seed)
    start, n = agent["series"]["start"], agent["agent"]["bars"]
    book, calendar = float(agent["curve"][0]), (market.data.bars_per_year, market.data.bars_per_day)
    for suffix, fraction in (("", 1.0), ("_matched", agent["agent"]["exposure"])):
        for name, (curve, expo) in buy_and_hold(market, start, n, book, config, fraction).items():
            metrics = performance_metrics(curve, agent["series"]["timestamps"], *calendar)
            metrics |= {"exposure": float(expo.mean()), "trades": None}
            out[f"{name}_bh{suffix}"] = {"agent": metrics, "curve": curve, "series": {"exposure": expo}}
    return out


def agent_backtests(
    make_policy,
    market: PreparedMarket,
    split: str,
    config: EnvConfig,
    seed: int,
    samples: int,
    train_split: str = "train",
) -> dict:
    """An independent-mode agent's final backtest on `split`: make_policy(sample_seed, record) -> policy gives the
    argmax policy (sample_seed None; with `record`, a list it fills with (ret_1, P(increase), increase allowed) each
    bar) and the sampled one. Returns "reports" (name -> metrics: the agent argmax, the mean over `samples` sampled
    runs, every baseline and the rule ceiling fitted on `train_split`; on the lead-lag market also "cross_rule", the
    cross rule fitted there, the ceiling of a learner that reads other symbols), "curves" (name -> equity), "series"
    (the argmax run's), "every_series" (name -> run_backtest's series of each strategy; buy-and-hold: its exposure),
    "rule", "cross_rule" (fit_cross_rule's result, or None) and "deciles" (P(increase exposure) by decile of ret_1)."""
    record: list = []
    full = run_backtest(make_policy(None, record), market, split, config, seed)
    sampled = [run_backtest(make_policy(seed + k, None), market, split, config, seed)["agent"] for k in range(samples)]
    rule = fit_rule(market, config, train_split)  # the best one-feature rule on the train split: the ceiling
    base = baseline_backtests(market, split, config, seed, full, rule)
    cross = None
    if market.data.leader_map is not None:  # the lead-lag market: its ceiling reads the leader's last bar
        cross = fit_cross_rule(market, config, train_split)
        base["cross_rule"] = run_backtest(cross_rule_policy(cross), market, split, config, seed)
    reports = {"agent": full["agent"], "agent_sampled": mean_metrics(sampled) if sampled else None}
    reports = {k: v for k, v in reports.items() if v is not None} | {name: b["agent"] for name, b in base.items()}
    curves = {"agent": full["curve"]} | {name: b["curve"] for name, b in base.items()}
    every = {"agent": full["series"]} | {name: b["series"] for name, b in base.items()}
    deciles = decile_table(*(np.concatenate(x) for x in zip(*record, strict=True)))
    return {"reports": reports, "curves": curves, "series": full["series"], "every_series": every, "rule": rule,
            "cross_rule": cross, "deciles": deciles}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Stress tests: the final weights under harsher costs, a slower market, the worst crash, and without each top symbol
# ---------------------------------------------------------------------------------------------------------------------
def one_bar_late(policy):
    """policy's orders reach the market one bar late: the action decided on bar t is submitted on bar t + 1 (so it
    fills at t + 2) under that bar's masks, where an action no longer allowed becomes HOLD; the first bar holds."""
    pending = None

    def act(obs):
        nonlocal pending
        decided, submit = policy(obs), pending
        pending = decided
        if submit is None:
            return np.zeros_like(decided)
        allowed = np.take_along_axis(obs["action_mask"], submit[..., None], axis=-1)[..., 0] == 1
        return np.where(allowed, submit, HOLD)

    return act


def without_symbol(policy, j: int):
    """policy, except that symbol j is never traded (it holds only cash: the book without that symbol)."""

    def act(obs):
        actions = np.array(policy(obs), copy=True)
        actions[..., j] = HOLD
        return actions

    return act


def worst_drawdown_window(market: PreparedMarket) -> tuple[int, int]:
    """[start, stop) of the benchmark's worst peak-to-trough fall after the warm-up (the crisis to replay)."""
    lo = max(market.warmup, market.lookback)
    bench = market.data.benchmark[lo:]
    trough = int(np.argmin(bench / np.maximum.accumulate(bench)))
    peak = int(np.argmax(bench[: trough + 1]))
    return lo + peak, lo + max(trough + 1, peak + 2)


def stress_tests(
    run, market: PreparedMarket, split: str, config: EnvConfig, drop: list[int], progress=None
) -> list[dict]:
    """The final report's stress table: run(market, split, config, wrap) -> name -> metrics backtests a strategy
    and its baselines with every policy passed through wrap (identity for most rows). Scenarios: the graded split
    with costs (commission and spread, and any flat cost) x2 and x3; square-root impact x5; every order one bar
    late; the data's worst benchmark drawdown replayed alone (its window may lie in the training split: the row says
    so); the graded split without each symbol of `drop` (the largest contributors). Returns one row per scenario:
    {"scenario", "description", "reports"}. progress(message), when given, hears each row as it starts."""
    same = lambda policy: policy  # noqa: E731

    def costs(k: float) -> EnvConfig:
        flat = None if config.volume_free_cost_bps is None else k * config.volume_free_cost_bps
        return replace(
            config,
            commission_bps=k * config.commission_bps,
            spread_bps=k * config.spread_bps,
            volume_free_cost_bps=flat,
        )

    impact = replace(config, impact_coef=5 * config.impact_coef)
    lo, hi = worst_drawdown_window(market)
    crisis = replace(market, splits=market.splits | {"crisis": (lo, hi)})
    tr_lo, tr_hi = market.splits["train"]
    ts = market.data.timestamps.astype("datetime64[D]")
    where = "inside the training split" if lo < tr_hi and hi > tr_lo else "outside the training split"
    scenarios = [
        ("costs_x2", "commission and spread x2", market, split, costs(2.0), same),
        ("costs_x3", "commission and spread x3", market, split, costs(3.0), same),
        ("impact_x5", "square-root impact x5", market, split, impact, same),
        ("latency_1_bar", "every order one bar late", market, split, config, one_bar_late),
        (
            "crisis_replay",
            f"worst benchmark drawdown, {ts[lo]} to {ts[hi - 1]} ({hi - lo} bars, {where})",
            crisis,
            "crisis",
            config,
            same,
        ),
    ]
    for j in drop:
        name = market.data.symbols[j]
        scenarios.append(
            (
                f"without_{name}",
                f"{name} never traded",
                market,
                split,
                config,
                lambda policy, j=j: without_symbol(policy, j),
            )
        )
    rows = []
    for n, (name, text, m, s, cfg, wrap) in enumerate(scenarios, 1):
        if progress is not None:
            progress(f"stress test {n}/{len(scenarios)}: {name}")
        rows.append({"scenario": name, "description": text, "reports": run(m, s, cfg, wrap)})
    return rows


def agent_stress(
    policy,
    rule: dict,
    market: PreparedMarket,
    split: str,
    config: EnvConfig,
    seed: int,
    top: int = 5,
    contribution: np.ndarray | None = None,
    progress=None,
) -> list[dict]:
    """stress_tests for an independent-mode agent's argmax `policy`: each row backtests the agent, a random policy at
    its trade rate under that stress, the rule ceiling and buy-and-hold of the benchmark and the equal-weight basket
    scaled to its exposure, all through the same wrap (buy-and-hold is not wrapped; without a symbol it keeps it).
    The dropped symbols are the `top` largest by |PnL contribution| (S,), or the first `top` without it."""

    def run(m, s, cfg, wrap):
        agent = run_backtest(wrap(policy), m, s, cfg, seed)
        out = {"agent": agent["agent"]}
        out["random"] = run_backtest(wrap(random_policy(seed + 1, agent["agent"]["trade_rate"])), m, s, cfg, seed)
        out["rule_ceiling"] = run_backtest(wrap(rule_policy(rule)), m, s, cfg, seed)
        out = {k: v if k == "agent" else v["agent"] for k, v in out.items()}
        start, n, book = agent["series"]["start"], agent["agent"]["bars"], float(agent["curve"][0])
        calendar = (m.data.bars_per_year, m.data.bars_per_day)
        for name, (curve, expo) in buy_and_hold(m, start, n, book, cfg, agent["agent"]["exposure"]).items():
            out[f"{name}_bh_matched"] = performance_metrics(curve, agent["series"]["timestamps"], *calendar)
            out[f"{name}_bh_matched"]["exposure"] = float(expo.mean())
        return out

    S = len(market.data.symbols)
    order = np.argsort(-np.abs(contribution)) if contribution is not None else np.arange(S)
    drop = [int(j) for j in order[: min(top, S)]] if S > 1 else []
    return stress_tests(run, market, split, config, drop, progress)


def format_stress(rows: list[dict]) -> str:
    """Markdown: one row per scenario, one column per strategy, each cell the Sharpe and the total return."""
    names = list(rows[0]["reports"])
    lines = ["| stress | " + " | ".join(names) + " | scenario |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        cells = [f"{r['sharpe']:.2f} ({r['total_return']:+.1%})" for r in row["reports"].values()]
        lines.append(f"| {row['scenario']} | " + " | ".join(cells) + f" | {row['description']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The master's baselines: lockstep sweeps of many directive choosers, the rules fitted on train, the oracle ceiling,
# the go criterion and the directive analysis
# ---------------------------------------------------------------------------------------------------------------------
# A chooser (a master) is choose(obs, core, last_policy_actions) -> (E,) directive indices, called at the decision
# bar core.t (E,); it may read a causal signal at index core.t and nothing later. The rules and the oracle are one
# kind of chooser (switch_chooser): per env, directive `on` while direction x signal[t] > threshold, else `off`.
# the go table's fixed "defensive" book: risk 0.5, cap 5%, defensive regime (the lowest risk that still trades)
DEFENSIVE_DIRECTIVE = int(np.ravel_multi_index((RISK_MULTIPLIERS.index(0.5), 0, 0), DIRECTIVE_SHAPE))
RULE_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the threshold rules' candidate thresholds (train quantiles)
CORR_FEATURE, REACTIVE_FEATURE = "avg_corr_2d", "xs_autocorr_1d"  # market_data.CROSS_SECTION_NAMES
GO_BASELINES = ("best_constant", "vol_target", "corr_rule", "reactive_rule")  # the master must match each's Sharpe


def sweep_backtests(
    policy, market: PreparedMarket, split: str, config: EnvConfig, seed: int, interval: int, chooser, num_envs: int
) -> dict:
    """run_backtest in portfolio mode for num_envs masters at once: one sequential VecTradingCore whose envs all
    start at the split's first bar after the lookback and step in lockstep to its last bar, policy(obs) -> (E, S)
    actions for every env each bar, chooser(obs, core, last_policy_actions) -> (E,) directives every `interval` bars
    (each env its own). Env e's curve is run_backtest's for a master that picks what the chooser picks for env e
    (a test checks it). Returns {"curves": book equity (E, N+1), "exposure": holdings / equity (E, N),
    "directives": the directive in force at each bar (E, N), totals per env (E,): "costs", "trades" (filled orders),
    "traded" (filled notional); "timestamps" (N+1,), "start": the first bar}."""
    core = VecTradingCore(market, num_envs, split, "portfolio", config, seed, sequential=True)
    obs = core.reset(seed=seed)
    E, S, start, n = core.num_envs, core.num_symbols, int(core.t[0]), int(core.end[0] - core.t[0])
    if start != core.split_start or (core.t != start).any() or (core.end != core.split_last).any():
        raise RuntimeError("sweep_backtests: the sequential envs do not all run from the split's first to last bar.")
    curves, exposure = np.empty((E, n + 1)), np.empty((E, n))
    curves[:, 0] = float(config.initial_capital)
    directives = np.empty((E, n), dtype=np.int64)
    costs, trades, traded = np.zeros(E), np.zeros(E, dtype=np.int64), np.zeros(E)
    last_actions = np.zeros((E, S), np.int64)
    for i in range(n):
        if i % interval == 0:
            core.set_directives(np.asarray(chooser(obs, core, last_actions), dtype=np.int64))
        directives[:, i] = core.directive_index
        obs, _, terminated, truncated, info = core.step(policy(obs))
        last_actions = info["policy_action"].copy()
        curves[:, i + 1] = info["equity"][:, 0]  # the account's equity, before any reset at the sweep's end
        exposure[:, i] = info["holdings"].sum(1) / curves[:, i + 1]
        costs += info["cost"].sum(1)
        trades += (info["traded_shares"] != 0).sum(1)
        traded += (np.abs(info["traded_shares"]) * info["fill_price"]).sum(1)
        in_step = not truncated.any() if i < n - 1 else bool((terminated | truncated).any(1).all())
        if not in_step:
            raise RuntimeError(f"sweep_backtests: the sweep of {split!r} ended out of step at {i + 1} of {n}; a bug.")
    timestamps = market.data.timestamps[start : start + n + 1]
    return {"curves": curves, "exposure": exposure, "directives": directives, "costs": costs, "trades": trades,
            "traded": traded, "timestamps": timestamps, "start": start}  # fmt: skip


def sweep_metrics(sweep: dict, market: PreparedMarket) -> list[dict]:
    """Each env of a sweep_backtests result -> performance_metrics plus exposure (mean holdings / equity), trades,
    annualised turnover and costs, as run_backtest reports them (one call per env, after the sweep)."""
    calendar = (market.data.bars_per_year, market.data.bars_per_day)
    n = sweep["exposure"].shape[1]
    out = []
    for e, curve in enumerate(sweep["curves"]):
        m = performance_metrics(curve, sweep["timestamps"], *calendar)
        m.update(
            exposure=float(sweep["exposure"][e].mean()),
            trades=int(sweep["trades"][e]),
            turnover=float(sweep["traded"][e] / curve.mean() * calendar[0] / n),
            costs=float(sweep["costs"][e]),
            costs_frac=float(sweep["costs"][e] / curve[0]),
        )
        out.append(m)
    return out


def fixed_directive(index: int):
    """A master that always picks directive `index`."""
    return lambda obs, core, last_actions: np.full(core.num_envs, index)


def switch_chooser(signals: np.ndarray, column, direction, threshold, on, off):
    """A master that switches between two directives on a causal signal read at the decision bar t = core.t:
    on[e] where direction[e] x signals[t, column[e]] > threshold[e], else off[e] (a NaN signal: off). signals
    (T, k); the other arguments (E,) arrays, one rule per env, or scalars, one rule for every env. The threshold
    rules and the oracle (its signal the hidden label, 1 in R, threshold 0.5) are such masters."""
    signals = np.asarray(signals, dtype=np.float64)
    direction, threshold = np.asarray(direction, dtype=np.float64), np.asarray(threshold, dtype=np.float64)
    on, off, column = (np.asarray(x, dtype=np.int64) for x in (on, off, column))

    def choose(obs, core, last_actions):
        return np.where(direction * signals[core.t, column] > threshold, on, off)

    return choose


def stack_choosers(choosers: list):
    """One master for a sweep of len(choosers) envs: env e follows choosers[e] (each is asked for every env and
    its answer for env e is kept; a loop over the few baselines at decision bars only)."""

    def choose(obs, core, last_actions):
        return np.array([int(np.asarray(c(obs, core, last_actions))[e]) for e, c in enumerate(choosers)])

    return choose


def cross_section_signals(market: PreparedMarket, features: dict | None = None) -> dict[str, np.ndarray]:
    """The cross-sectional state the threshold rules read: name -> (T,) feature, by default
    market_data.cross_section_features(market.data) under market_data.CROSS_SECTION_NAMES (avg_corr_2d,
    dispersion_1d, xs_autocorr_1d); `features` (name -> (T,)) replaces it (tests, other signals)."""
    if features is None:
        from market_data import CROSS_SECTION_NAMES, cross_section_features

        features = dict(zip(CROSS_SECTION_NAMES, np.asarray(cross_section_features(market.data)).T, strict=True))
    T = len(market.data.timestamps)
    for name, x in features.items():
        if np.shape(x) != (T,):
            raise ValueError(f"cross-section feature {name!r} has shape {np.shape(x)}; it needs one a bar, ({T},).")
    return {name: np.asarray(x, dtype=np.float64) for name, x in features.items()}


def edge_labels(market: PreparedMarket) -> np.ndarray | None:
    """The synthetic market's hidden daily edge state (T,), 0 = M (the symbol agents earn), 1 = R (they lose), or
    None where the data has none. Never part of an observation: only the oracle and the analysis read it."""
    labels = getattr(market.data, "edge_labels", None)
    if labels is not None and np.shape(labels) != (len(market.data.timestamps),):
        raise ValueError(f"market.data.edge_labels has shape {np.shape(labels)}; it needs one label a bar.")
    return labels


def _decision_bars(market: PreparedMarket, split: str, config: EnvConfig, interval: int) -> np.ndarray:
    """The bars at which a sweep of `split` asks its master, as sweep_backtests and run_backtest do."""
    core = VecTradingCore(market, 1, split, "portfolio", config, 0, sequential=True)
    return np.arange(core.split_start, core.split_last, interval)


def _candidate_sweep(policy, market, split, config, seed, interval, signals: np.ndarray, spec: dict) -> list[dict]:
    """Train metrics of one switch_chooser rule per env (spec: column, direction, threshold, on, off, each (E,))."""
    sweep = sweep_backtests(policy, market, split, config, seed, interval, switch_chooser(signals, **spec),
                            len(spec["on"]))  # fmt: skip
    return sweep_metrics(sweep, market)


def fit_fixed_directive(
    policy, market: PreparedMarket, config: EnvConfig, seed: int, interval: int, split: str = "train"
) -> dict:
    """Every constant directive on `split`, in one sweep of 60 envs: "best" the one with the best daily Sharpe (the
    best constant), "defensive" the one with the least exposure (the low end of the threshold rules), and each
    directive's Sharpe, exposure, max drawdown and its book's bar-return mean and mean square (bar_mean, bar_mean_sq:
    mappo_master.py calibrates its risk aversion on them)."""
    sweep = sweep_backtests(policy, market, split, config, seed, interval,
                            lambda obs, core, last_actions: np.arange(NUM_DIRECTIVES), NUM_DIRECTIVES)  # fmt: skip
    metrics = sweep_metrics(sweep, market)
    sharpes = [m["sharpe"] for m in metrics]
    exposures = [m["exposure"] for m in metrics]
    best, defensive = int(np.argmax(sharpes)), int(np.argmin(exposures))
    r = np.diff(sweep["curves"], axis=1) / sweep["curves"][:, :-1]  # (60, N) bar returns of each directive's book
    return {"best": best, "best_sharpe": sharpes[best], "best_exposure": exposures[best], "defensive": defensive,
            "defensive_sharpe": sharpes[defensive], "defensive_exposure": exposures[defensive], "sharpes": sharpes,
            "exposures": exposures, "max_drawdowns": [m["max_drawdown"] for m in metrics],
            "bar_mean": r.mean(1).tolist(), "bar_mean_sq": (r * r).mean(1).tolist(), "split": split,
            "interval": interval}  # fmt: skip


def _threshold_candidates(x: np.ndarray, column: int, fixed: dict) -> tuple[list[dict], dict]:
    """The threshold rule's candidates on the feature's values at the decision bars x (n,): each direction (+1:
    low while the feature is above the threshold, -1: below), thresholds at the RULE_QUANTILES of direction x x."""
    finite = x[np.isfinite(x)]
    if len(finite) == 0:
        raise ValueError("fit_threshold_rule: the feature has no finite value at the decision bars of the split.")
    rows = [
        {"direction": d, "quantile": q, "threshold": float(theta)}
        for d in (1.0, -1.0)
        for q, theta in zip(RULE_QUANTILES, np.quantile(d * finite, RULE_QUANTILES), strict=True)
    ]
    k = len(rows)
    spec = {"column": np.full(k, column), "direction": np.array([r["direction"] for r in rows]),
            "threshold": np.array([r["threshold"] for r in rows]), "on": np.full(k, fixed["defensive"]),
            "off": np.full(k, fixed["best"])}  # fmt: skip
    return rows, spec


def _pick_threshold(name: str, rows: list[dict], metrics: list[dict], fixed: dict, split: str, interval: int) -> dict:
    for row, m in zip(rows, metrics, strict=True):
        row |= {"sharpe": m["sharpe"], "exposure": m["exposure"]}
    best = max(range(len(rows)), key=lambda k: rows[k]["sharpe"])  # the first of equals
    return {"feature": name, **{k: rows[best][k] for k in ("direction", "quantile", "threshold", "sharpe", "exposure")},
            "on": fixed["defensive"], "off": fixed["best"], "candidates": rows, "split": split,
            "interval": interval}  # fmt: skip


def fit_threshold_rule(
    policy,
    market: PreparedMarket,
    config: EnvConfig,
    seed: int,
    interval: int,
    feature_name: str,
    split: str = "train",
    fixed: dict | None = None,
    features: dict | None = None,
) -> dict:
    """A one-feature threshold rule for the master, fitted on `split`: the defensive directive (fixed["defensive"],
    the least-exposure constant) while the cross-section feature `feature_name` at the decision bar crosses a
    threshold, the best constant (fixed["best"]) otherwise. Candidates: thresholds at the split's RULE_QUANTILES of
    the feature at the decision bars, both directions ("direction" +1: defensive above the threshold, -1: below),
    all in one sweep; the best daily Sharpe on the split wins. fixed: fit_fixed_directive's result on the same
    split (fitted here when None); features: cross_section_signals' argument."""
    fixed = fit_fixed_directive(policy, market, config, seed, interval, split) if fixed is None else fixed
    signals = cross_section_signals(market, features)
    if feature_name not in signals:
        raise ValueError(f"fit_threshold_rule: no cross-section feature {feature_name!r}; there are {list(signals)}.")
    x = signals[feature_name][:, None]  # (T, 1)
    rows, spec = _threshold_candidates(x[_decision_bars(market, split, config, interval), 0], 0, fixed)
    metrics = _candidate_sweep(policy, market, split, config, seed, interval, x, spec)
    return _pick_threshold(feature_name, rows, metrics, fixed, split, interval)


def threshold_chooser(rule: dict, features: dict[str, np.ndarray]):
    """fit_threshold_rule's rule as a master; features: cross_section_signals(market)."""
    x = features[rule["feature"]][:, None]
    return switch_chooser(x, 0, rule["direction"], rule["threshold"], rule["on"], rule["off"])


def _oracle_spec(labels: np.ndarray, fixed: dict) -> tuple[np.ndarray, dict]:
    """The oracle's coordinate search as switch_chooser rules on the label (1 in R): envs 0..59 play directive k in
    R and the best constant in M; envs 60..119 the best constant in R and k in M."""
    k, best = np.arange(NUM_DIRECTIVES), np.full(NUM_DIRECTIVES, fixed["best"])
    spec = {"column": np.zeros(2 * NUM_DIRECTIVES, np.int64), "direction": np.ones(2 * NUM_DIRECTIVES),
            "threshold": np.full(2 * NUM_DIRECTIVES, 0.5), "on": np.r_[k, best], "off": np.r_[best, k]}  # fmt: skip
    return np.asarray(labels, dtype=np.float64)[:, None], spec


def _pick_oracle(policy, market, split, config, seed, interval, labels, fixed: dict, metrics: list[dict]) -> dict:
    """The oracle from its coordinate search's metrics (see fit_oracle), with the pair (d_M, d_R) checked."""
    sharpe_r = [m["sharpe"] for m in metrics[:NUM_DIRECTIVES]]  # d_R = k, M at the best constant
    sharpe_m = [m["sharpe"] for m in metrics[NUM_DIRECTIVES:]]  # d_M = k, R at the best constant
    d_r, d_m, best = int(np.argmax(sharpe_r)), int(np.argmax(sharpe_m)), fixed["best"]
    signals = np.asarray(labels, dtype=np.float64)[:, None]
    pair = {"column": [0], "direction": [1.0], "threshold": [0.5], "on": [d_r], "off": [d_m]}
    pair_sharpe = _candidate_sweep(policy, market, split, config, seed, interval, signals, pair)[0]["sharpe"]
    candidates = [  # (d_M, d_R, train Sharpe): the start, each coordinate's move, both moves
        (best, best, fixed["best_sharpe"]), (best, d_r, sharpe_r[d_r]), (d_m, best, sharpe_m[d_m]),
        (d_m, d_r, pair_sharpe),
    ]  # fmt: skip
    pick_m, pick_r, sharpe = max(candidates, key=lambda c: c[2])  # the first of equals: the fewest moves
    return {"d_M": pick_m, "d_R": pick_r, "sharpe": sharpe, "start": best, "d_R_search": d_r, "d_M_search": d_m,
            "pair_sharpe": pair_sharpe, "sharpes_R": sharpe_r, "sharpes_M": sharpe_m, "split": split,
            "interval": interval,
            "search": "one round of coordinate search from the best constant d*: the 60 directives in R with d* in "
                      "M, the 60 in M with d* in R (one sweep), then the pair; the best train Sharpe of d*, the "
                      "two single moves and the pair"}  # fmt: skip


def fit_oracle(
    policy,
    market: PreparedMarket,
    config: EnvConfig,
    seed: int,
    interval: int,
    split: str = "train",
    fixed: dict | None = None,
) -> dict:
    """The ceiling of a master, not a baseline: the best directive per hidden edge state, d_M in M and d_R in R, fitted
    on `split` with the hidden label (market.data.edge_labels) that no observation holds. One round of coordinate
    search from the best constant d* (fit_fixed_directive): the 60 directives in R while M keeps d*, and the 60 in
    M while R keeps d* (one sweep of 120 envs) give d_R and d_M by train Sharpe; the pair (d_M, d_R) is then checked
    (one more env) and the best of d* alone, each single move and the pair is kept, so the oracle's train Sharpe is
    at least the best constant's. Its chooser (oracle_chooser) reads the label at the decision bar."""
    labels = edge_labels(market)
    if labels is None:
        raise ValueError("fit_oracle: the market has no hidden edge labels (market.data.edge_labels); no oracle.")
    fixed = fit_fixed_directive(policy, market, config, seed, interval, split) if fixed is None else fixed
    signals, spec = _oracle_spec(labels, fixed)
    metrics = _candidate_sweep(policy, market, split, config, seed, interval, signals, spec)
    return _pick_oracle(policy, market, split, config, seed, interval, labels, fixed, metrics)


def oracle_chooser(oracle: dict, labels: np.ndarray):
    """fit_oracle's result as a master: d_R where the hidden label at the decision bar core.t is R (1), else d_M."""
    return switch_chooser(np.asarray(labels, dtype=np.float64)[:, None], 0, 1.0, 0.5, oracle["d_R"], oracle["d_M"])


def fit_vol_target(market: PreparedMarket, split: str = "train") -> dict:
    """The volatility-targeting rule for the master, fitted on `split`: the risk multiplier is proportional to
    target / realised benchmark volatility (the regime feature vol_level, known at the decision), with the target the
    median of vol_level on the split, so that the rule's typical multiplier is 1."""
    lo, hi = market.splits[split]
    vol = market.regime[lo:hi, market.regime_names.index("vol_level")]
    return {"target_vol": float(np.median(vol[vol > 0])) if (vol > 0).any() else 1.0, "split": split}


def vol_target_directive(rule: dict, vol_index: int = 0):
    """fit_vol_target's rule as a master for run_backtest: the grid's risk multiplier nearest target / vol_level,
    the neutral concentration level and regime mode."""
    risks = np.asarray(RISK_MULTIPLIERS)

    def choose(obs, core, last_actions):
        vol = np.maximum(obs["regime"][:, 0, vol_index].astype(np.float64), 1e-6)  # (E,)
        r = np.abs(risks[None, :] - (rule["target_vol"] / vol)[:, None]).argmin(1)
        return np.ravel_multi_index((r, np.ones_like(r), np.ones_like(r)), DIRECTIVE_SHAPE)

    return choose


def fit_master_baselines(
    policy,
    market: PreparedMarket,
    config: EnvConfig,
    seed: int,
    interval: int,
    split: str = "train",
    features: dict | None = None,
) -> dict:
    """Every baseline of the master fitted on `split` (the train split: nothing of the graded split is read), as
    plain JSON: "fixed" (fit_fixed_directive: the best constant and the least-exposure one), "vol_target"
    (fit_vol_target), "corr_rule" and "reactive_rule" (fit_threshold_rule on avg_corr_2d and on xs_autocorr_1d),
    and "oracle" (fit_oracle, only where the data has hidden edge labels). Three sweeps: the 60 constants; both rules'
    candidates and the oracle's coordinate search together (144 envs); the oracle's pair."""
    fixed = fit_fixed_directive(policy, market, config, seed, interval, split)
    signals = cross_section_signals(market, features)
    names = list(signals)
    columns = np.column_stack([signals[n] for n in names])  # (T, k)
    t = _decision_bars(market, split, config, interval)
    parts, specs = {}, []
    for key, name in (("corr_rule", CORR_FEATURE), ("reactive_rule", REACTIVE_FEATURE)):
        if name not in signals:
            raise ValueError(f"fit_master_baselines: no cross-section feature {name!r}; there are {names}.")
        rows, spec = _threshold_candidates(columns[t, names.index(name)], names.index(name), fixed)
        parts[key] = (name, rows)
        specs.append(spec)
    labels = edge_labels(market)
    if labels is not None:
        columns = np.column_stack([columns, np.asarray(labels, dtype=np.float64)])
        oracle_spec = _oracle_spec(labels, fixed)[1] | {"column": np.full(2 * NUM_DIRECTIVES, len(names))}
        specs.append(oracle_spec)
    spec = {k: np.concatenate([s[k] for s in specs]) for k in specs[0]}
    metrics = _candidate_sweep(policy, market, split, config, seed, interval, columns, spec)
    fitted = {"split": split, "interval": interval, "fixed": fixed, "vol_target": fit_vol_target(market, split)}
    k = 0
    for key, (name, rows) in parts.items():
        fitted[key] = _pick_threshold(name, rows, metrics[k : k + len(rows)], fixed, split, interval)
        k += len(rows)
    if labels is not None:
        fitted["oracle"] = _pick_oracle(policy, market, split, config, seed, interval, labels, fixed, metrics[k:])
    return fitted


def baseline_choosers(fitted: dict, market: PreparedMarket, features: dict | None = None) -> dict:
    """fit_master_baselines' result as masters on `market` (any split): name -> chooser, "best_constant", "neutral",
    "vol_target", "corr_rule", "reactive_rule" and "oracle" when it was fitted (it needs the market's edge labels).
    features: cross_section_signals' argument."""
    signals = cross_section_signals(market, features)
    out = {
        "best_constant": fixed_directive(fitted["fixed"]["best"]),
        "neutral": fixed_directive(NEUTRAL_DIRECTIVE),
        "vol_target": vol_target_directive(fitted["vol_target"], market.regime_names.index("vol_level")),
        "corr_rule": threshold_chooser(fitted["corr_rule"], signals),
        "reactive_rule": threshold_chooser(fitted["reactive_rule"], signals),
    }
    if "oracle" in fitted:
        labels = edge_labels(market)
        if labels is None:
            raise ValueError("baseline_choosers: the oracle was fitted, but this market has no edge labels to read.")
        out["oracle"] = oracle_chooser(fitted["oracle"], labels)
    return out


def _exposure_matched(curve: np.ndarray, lev: float) -> np.ndarray:
    """A book's bar returns times lev, compounded from the same capital: plain de- (or re-) leveraging."""
    return curve[0] * np.r_[1.0, np.cumprod(1.0 + lev * np.diff(curve) / curve[:-1])]


def master_backtests(
    policy,
    master,
    market: PreparedMarket,
    split: str,
    config: EnvConfig,
    seed: int,
    interval: int,
    fitted: dict | None = None,
    features: dict | None = None,
    wrap=None,
) -> tuple[dict, dict, dict]:
    """The master's backtest in portfolio mode beside its baselines, all on the same symbol-agent policy, split,
    capital and costs: the master by run_backtest (its full series); in one sweep_backtests every master of
    baseline_choosers (the best constant, neutral, volatility target, correlation and reactive threshold rules, the
    oracle ceiling where fitted) and the fixed DEFENSIVE_DIRECTIVE (kept for the go benchmark's table);
    the best constant and the neutral book scaled to the master's average exposure ("best_constant_matched",
    "neutral_matched": their bar returns times the exposure ratio, plain de-leveraging); buy-and-hold. fitted:
    fit_master_baselines' result (fitted here on the train split when None); features: cross_section_signals'
    argument; wrap(policy) -> policy, applied afresh to each run (a stateful stress wrapper must not carry state from
    one run into the next). Returns (reports name -> metrics, results name -> {"agent", "curve", "series"} (series:
    run_backtest's for the master, timestamps, exposure and directives for a swept baseline, none for the scaled and
    buy-and-hold books), fitted)."""
    wrap = (lambda p: p) if wrap is None else wrap
    if fitted is None:
        fitted = fit_master_baselines(policy, market, config, seed, interval, features=features)
    results = {"master": run_backtest(wrap(policy), market, split, config, seed, "portfolio", master, interval)}
    choosers = baseline_choosers(fitted, market, features) | {"defensive": fixed_directive(DEFENSIVE_DIRECTIVE)}
    together = stack_choosers(list(choosers.values()))
    sweep = sweep_backtests(wrap(policy), market, split, config, seed, interval, together, len(choosers))
    for e, (name, metrics) in enumerate(zip(choosers, sweep_metrics(sweep, market), strict=True)):
        series = {"timestamps": sweep["timestamps"], "start": sweep["start"], "interval": interval,
                  "exposure": sweep["exposure"][e], "directives": sweep["directives"][e]}  # fmt: skip
        results[name] = {"agent": metrics, "curve": sweep["curves"][e], "series": series}
    reports = {name: r["agent"] for name, r in results.items()}
    timestamps = results["master"]["series"]["timestamps"]
    calendar = (market.data.bars_per_year, market.data.bars_per_day)
    for name in ("neutral", "best_constant"):
        held = reports[name]["exposure"]  # a flat book (risk 0) cannot be scaled: its matched book stays flat
        lev = reports["master"]["exposure"] / held if held > 0 else 0.0
        scaled = _exposure_matched(results[name]["curve"], lev)
        metrics = performance_metrics(scaled, timestamps, *calendar) | {"exposure": reports[name]["exposure"] * lev}
        results[f"{name}_matched"], reports[f"{name}_matched"] = {"agent": metrics, "curve": scaled}, metrics
    start, book = results["master"]["series"]["start"], float(results["master"]["curve"][0])
    for name, (curve, expo) in buy_and_hold(market, start, reports["master"]["bars"], book, config).items():
        metrics = performance_metrics(curve, timestamps, *calendar) | {"exposure": float(expo.mean())}
        results[f"{name}_bh"], reports[f"{name}_bh"] = {"agent": metrics, "curve": curve}, metrics
    return reports, results, fitted


def paired_sharpe_margin(curve_a: np.ndarray, curve_b: np.ndarray, timestamps: np.ndarray, market) -> tuple:
    """Sharpe(a) - Sharpe(b) of two books on the same bars (equity (N+1,) at timestamps), annualised from daily
    returns as performance_metrics, and its standard error from the daily pairs: with d_t = r_a,t / sd(r_a) -
    r_b,t / sd(r_b) (sd with ddof 1; a book without risk contributes 0), mean(d) is the margin per day, and the
    error is the Newey-West (Bartlett kernel, sharpe_hac_se's lags) standard error of that mean, annualised the same
    way. An approximation: it treats the two standard deviations as known, dropping the delta-method terms of their
    sampling error (Jobson and Korkie 1981, Ledoit and Wolf 2008), which are second order for Sharpes near 0 and
    partly cancel for two books that hold the same symbols; the pairing itself (the books' common noise) is kept.
    market: anything with data.bars_per_year and data.bars_per_day. Returns (margin, se); se None under 3 days."""
    ra, rb = (daily_returns(c, timestamps)[1] for c in (curve_a, curve_b))
    return paired_daily_margin(ra, rb, market.data.bars_per_year / market.data.bars_per_day)


def paired_daily_margin(ra: np.ndarray, rb: np.ndarray, days_per_year: float) -> tuple:
    """paired_sharpe_margin on two books' daily returns (n,) of the same days: (margin, se)."""
    ann = np.sqrt(days_per_year)
    n = len(ra)
    if n < 2:
        return 0.0, None
    z = [r / r.std(ddof=1) if r.std(ddof=1) > 1e-15 else np.zeros_like(r) for r in (ra, rb)]
    d = z[0] - z[1]
    margin = float(d.mean() * ann)
    if n < 3:
        return margin, None
    u = d - d.mean()
    lags = min(int(4 * (n / 100) ** (2 / 9)), n - 1)
    lrv = u @ u / n + 2.0 * sum((1.0 - lag / (lags + 1)) * (u[lag:] @ u[:-lag]) / n for lag in range(1, lags + 1))
    return margin, float(np.sqrt(max(lrv, 0.0) / n) * ann)


def master_go_criterion(
    reports: dict[str, dict], curves: dict[str, np.ndarray], timestamps: np.ndarray, market, drawdown_cut: float = 0.15
) -> dict:
    """The master's go criterion on the graded split: "go" (also "passed") when (a) its Sharpe >= that of each of
    GO_BASELINES (the best constant, the volatility target, the correlation and the reactive threshold rules, all
    fitted on train), and (b) its max drawdown is at least `drawdown_cut` below that of the best constant scaled to
    its exposure ("best_constant_matched": de-leveraging alone cannot pass). Reported beside it, from the paired
    daily returns (paired_sharpe_margin): "margin_vs_best_constant" = Sharpe(master) - Sharpe(best constant) with
    its standard error; where the oracle exists, its gain over the best constant with the same error, the master's
    share of that gain, and "oracle_preflight_ok" = gain >= 1 standard error (is there timing skill to find at
    all?). Also the figures of the earlier criterion (drawdown cut vs the exposure-matched neutral book, its Sharpe
    and the volatility target's) and, where present, whether the master beats the fixed defensive directive.
    curves: name -> equity (N+1,) on `timestamps`, holding the master, the best constant and the oracle if any."""
    missing = [k for k in ("master", "best_constant_matched", "neutral_matched", *GO_BASELINES) if k not in reports]
    if missing:
        raise ValueError(f"master_go_criterion: the reports lack {missing}; run master_backtests first.")
    master = reports["master"]

    def cut(other: dict) -> float:
        return 1.0 - abs(master["max_drawdown"]) / abs(other["max_drawdown"]) if other["max_drawdown"] < 0 else 0.0

    parts = {"sharpe_master": master["sharpe"], "sharpe_baselines": {k: reports[k]["sharpe"] for k in GO_BASELINES}}
    parts["sharpe_passed"] = bool(all(master["sharpe"] >= s for s in parts["sharpe_baselines"].values()))
    parts["drawdown_cut_vs_matched_best_constant"] = cut(reports["best_constant_matched"])
    parts["drawdown_passed"] = bool(parts["drawdown_cut_vs_matched_best_constant"] >= drawdown_cut)
    parts["go"] = parts["passed"] = parts["sharpe_passed"] and parts["drawdown_passed"]
    margin, se = paired_sharpe_margin(curves["master"], curves["best_constant"], timestamps, market)
    parts |= {"margin_vs_best_constant": margin, "margin_se": se}
    parts |= dict.fromkeys(("oracle_gain", "oracle_gain_se", "master_share_of_oracle_gain", "oracle_preflight_ok"))
    if "oracle" in curves:
        gain, gain_se = paired_sharpe_margin(curves["oracle"], curves["best_constant"], timestamps, market)
        parts |= {"oracle_gain": gain, "oracle_gain_se": gain_se,
                  "master_share_of_oracle_gain": margin / gain if gain > 0 else None,
                  "oracle_preflight_ok": bool(gain_se is not None and gain >= gain_se)}  # fmt: skip
    parts |= {
        "exposure_master": master["exposure"],
        "exposure_best_constant": reports["best_constant"]["exposure"],
        "drawdown_cut_vs_matched_neutral": cut(reports["neutral_matched"]),
        "sharpe_matched_neutral": reports["neutral_matched"]["sharpe"],
        "sharpe_vol_target": reports["vol_target"]["sharpe"],
    }
    if "defensive" in reports:
        parts["sharpe_defensive"] = reports["defensive"]["sharpe"]
        parts["beats_defensive"] = bool(master["sharpe"] >= reports["defensive"]["sharpe"])
    parts["criterion"] = (
        f"Sharpe >= each of {', '.join(GO_BASELINES)} (fitted on train), and max drawdown >= {drawdown_cut:.0%} "
        "below the exposure-matched best constant's"
    )
    return parts


def format_go_criterion(go: dict) -> str:
    """One line: the master go criterion, passed or missed, with its figures, the paired margin and the oracle."""
    baselines = ", ".join(f"{k} {v:.2f}" for k, v in go["sharpe_baselines"].items())
    se = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
    text = (
        f"go criterion ({go['criterion']}): {'passed' if go['go'] else 'missed'}; Sharpe {go['sharpe_master']:.2f} vs "
        f"{baselines}; drawdown cut vs the exposure-matched best constant "
        f"{go['drawdown_cut_vs_matched_best_constant']:.1%}; margin over the best constant "
        f"{go['margin_vs_best_constant']:+.2f} (se {se(go['margin_se'])})"
    )
    if go["oracle_gain"] is not None:
        share = go["master_share_of_oracle_gain"]
        text += (
            f"; oracle gain {go['oracle_gain']:+.2f} (se {se(go['oracle_gain_se'])}, preflight "
            f"{'ok' if go['oracle_preflight_ok'] else 'failed'}), the master's share "
            f"{f'{share:.0%}' if share is not None else '-'}"
        )
    return text


def _is_defensive(directives: np.ndarray, reference: int | None = None) -> np.ndarray:
    """A directive is defensive when its risk multiplier is below 1.0 or its regime mode is defensive; with a
    reference directive, when its risk multiplier is below the reference's or its regime mode more defensive."""
    coords = np.unravel_index(directives, DIRECTIVE_SHAPE)
    if reference is None:
        return (np.take(RISK_MULTIPLIERS, coords[0]) < 1.0) | (coords[2] == REGIME_MODES.index("defensive"))
    risk, _, mode = np.unravel_index(reference, DIRECTIVE_SHAPE)
    return (coords[0] < risk) | (coords[2] < mode)  # both grids ascend: risk 0 (flat) .. 1.25, defensive .. aggressive


def directive_analysis(series: dict, market: PreparedMarket, reference: int | None = None) -> dict:
    """Why the master chose what it chose, after the fact and for analysis only (nothing here reaches an
    observation): the correlation of the chosen risk multiplier with each regime feature over the bars, and, where
    the data has them (the synthetic market), the mean risk multiplier, regime mode (-1 defensive, +1 aggressive)
    and exposure under each hidden regime label and on the downturn-warning days. Where the data has hidden edge
    labels, "by_edge_state" (M, R): P(defensive) over the decision bars of that state (every series["interval"]-th
    bar, the label read at the decision bar; defensive: risk multiplier below 1.0 or the defensive regime mode, or,
    given a reference directive such as the best constant, a lower risk multiplier or a more defensive mode than
    the reference's: a master pinned to a defensive anchor is otherwise always "defensive"), and the mean risk
    multiplier and exposure over the bars of that state; "p_defensive_given_R" and "p_defensive_given_M" repeat the
    first; "defensive_reference" names the reference (None: the absolute definition)."""
    d = np.asarray(series["directives"])
    keep = d >= 0
    t = (series["start"] + np.arange(len(d)))[keep]  # the decision bar of each step
    coords = np.unravel_index(d[keep], DIRECTIVE_SHAPE)
    risk, mode = np.take(RISK_MULTIPLIERS, coords[0]), coords[2] - 1.0
    exposure = np.asarray(series["exposure"])[keep]
    corr = {}
    for j, name in enumerate(market.regime_names):
        x = market.regime[t, j]
        corr[name] = float(np.corrcoef(risk, x)[0, 1]) if risk.std() > 0 and x.std() > 0 else 0.0
    out = {"bars": int(keep.sum()), "risk_multiplier_corr": corr, "by_regime": {}}
    edges = edge_labels(market)
    if edges is not None and keep.any():
        step = np.arange(len(d))[keep]
        decision = step % int(series.get("interval", 1)) == 0
        defensive = _is_defensive(d[keep], reference)
        out["by_edge_state"], out["defensive_reference"] = {}, None if reference is None else int(reference)
        for k, name in enumerate(("M", "R")):
            g, gd = edges[t] == k, (edges[t] == k) & decision
            out["by_edge_state"][name] = {
                "bars": int(g.sum()),
                "decisions": int(gd.sum()),
                "p_defensive": float(defensive[gd].mean()) if gd.any() else None,
                "risk_multiplier": float(risk[g].mean()) if g.any() else None,
                "exposure": float(exposure[g].mean()) if g.any() else None,
            }
            out[f"p_defensive_given_{name}"] = out["by_edge_state"][name]["p_defensive"]
    labels = market.data.regime_labels
    if labels is None or not keep.any():
        return out
    groups = {name: labels[t] == k for k, name in enumerate(REGIME_NAMES_SYNTH)}
    if market.data.source == "synthetic":  # whole days of bars_per_day bars: the warning days of the generator
        per_day = int(market.data.bars_per_day)
        groups["warning"] = np.repeat(downturn_warning(labels[::per_day]), per_day)[t]
    for name, g in groups.items():
        if g.any():
            means = {"risk_multiplier": risk[g], "regime_mode": mode[g], "exposure": exposure[g]}
            out["by_regime"][name] = {"bars": int(g.sum())} | {k: float(v.mean()) for k, v in means.items()}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The report: stdout, JSON, Markdown, parquet
# ---------------------------------------------------------------------------------------------------------------------
REPORT_KEYS = (
    "total_return",
    "cagr",
    "sharpe",
    "sharpe_se",
    "psr",
    "dsr",
    "dsr_trials",
    "sortino",
    "sharpe_bar",
    "bar_autocorr",
    "max_drawdown",
    "max_drawdown_bars",
    "calmar",
    "exposure",
    "trades",
    "trade_rate",
    "orders_cancelled",
    "orders_shrunk",
    "round_trips",
    "win_rate",
    "liquidations",
    "turnover",
    "costs",
)


def format_report(reports: dict[str, dict], split: str) -> str:
    """Markdown table: one row per metric, one column per strategy ("-" where a metric does not apply)."""
    names = list(reports)
    lines = [f"| {split} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in REPORT_KEYS:
        cells = [reports[n].get(k) for n in names]
        if all(c is None for c in cells):
            continue
        cells = [f"{c:.4g}" if isinstance(c, float) else ("-" if c is None else str(c)) for c in cells]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_bar_files(run_dir, split: str, curves: dict, every_series: dict, timestamps, symbols: list[str]) -> None:
    """Per-bar files of a final backtest, in long format (one row per bar and strategy, or per bar, strategy and
    symbol), for pandas, quantstats, pyfolio or alphalens: <split>_bars.parquet (equity, bar return and exposure of
    every strategy), <split>_positions.parquet (the value held in each symbol, where not 0) and <split>_fills.parquet
    (every filled order: shares, negative when sold, fill price, notional and the costs it paid) of every strategy
    that trades through the environment (buy-and-hold's one entry is in its curve, not listed as a fill)."""
    bar_times = pd.DatetimeIndex(timestamps[1:], name="timestamp")  # bar i's outcome is known at the next bar's time
    bars, positions, fills = [], [], []
    for name, curve in curves.items():
        series = every_series.get(name, {})
        bars.append(pd.DataFrame({"timestamp": bar_times, "strategy": name, "equity": curve[1:],
                                  "return": curve[1:] / curve[:-1] - 1.0,
                                  "exposure": series.get("exposure", np.full(len(bar_times), np.nan))}))  # fmt: skip
        if "holdings" not in series:
            continue
        t, s = np.nonzero(series["holdings"])
        positions.append(pd.DataFrame({"timestamp": bar_times[t], "strategy": name, "symbol": np.take(symbols, s),
                                       "value": series["holdings"][t, s]}))  # fmt: skip
        f = series["fills"]
        t, s = np.nonzero(f["shares"])
        fills.append(pd.DataFrame({"timestamp": bar_times[t], "strategy": name, "symbol": np.take(symbols, s),
                                   "shares": f["shares"][t, s], "price": f["price"][t, s],
                                   "notional": np.abs(f["shares"][t, s]) * f["price"][t, s],
                                   "cost": f["cost"][t, s]}))  # fmt: skip
    for stem, frames in (("bars", bars), ("positions", positions), ("fills", fills)):
        if frames:
            pd.concat(frames, ignore_index=True).to_parquet(Path(run_dir) / f"{split}_{stem}.parquet")


CEILINGS = ("rule_ceiling", "oracle")  # what no strategy is expected to reach: reported, never a baseline


def verdict(reports: dict[str, dict], where: str, agent: str = "agent") -> str:
    """One sentence on what the figures mean: the strategy's Sharpe with its robust error, P(Sharpe > 0), the DSR
    when selection had trials, beside the best baseline (buy-and-hold, random, cash, fixed directives) and the
    ceilings (the one-feature rule, the master's oracle; never counted as baselines), and whether luck, selection or
    the baselines explain it."""
    me = reports[agent]
    others = {k: v for k, v in reports.items() if k != agent and not k.startswith(agent) and k not in CEILINGS}
    best = max(others, key=lambda k: others[k]["sharpe"]) if others else None
    se, psr, dsr = me.get("sharpe_se"), me.get("psr"), me.get("dsr")
    parts = [f"The {agent}'s Sharpe on the {where} is {me['sharpe']:.2f}"]
    if se is not None and psr is not None:
        parts.append(f" (robust standard error {se:.2f}; P(Sharpe > 0) = {psr:.2f}")
        if dsr is not None and me.get("dsr_trials", 1) > 1:
            parts.append(f"; deflated for the {me['dsr_trials']} candidates it was picked from, {dsr:.2f}")
        parts.append(")")
    if best is not None:
        parts.append(f", against {others[best]['sharpe']:.2f} for the best baseline ({best})")
    if "rule_ceiling" in reports:
        parts.append(f" and {reports['rule_ceiling']['sharpe']:.2f} for the one-feature rule ceiling")
    if "oracle" in reports:
        parts.append(f" and {reports['oracle']['sharpe']:.2f} for the oracle that reads the hidden edge state")
    confident = (dsr if dsr is not None and me.get("dsr_trials", 1) > 1 else psr) or 0.0
    margin = me["sharpe"] - (others[best]["sharpe"] if best is not None else 0.0)
    if confident >= 0.95 and se is not None and margin > 2 * se:
        parts.append(": an edge that neither luck, nor selection, nor the baselines explain.")
    elif confident >= 0.95:
        parts.append(": positive beyond luck, but not clearly above the best baseline (within two standard errors).")
    else:
        parts.append(": no evidence of an edge after costs (luck or selection could explain it).")
    return "".join(parts)


def save_backtest(
    run_dir,
    writer,
    reports: dict[str, dict],
    curves: dict,
    split: str,
    market: PreparedMarket,
    timestamps: np.ndarray,
    stress: list[dict] | None = None,
    agent: str = "agent",
    every_series: dict | None = None,
) -> str:
    """Write the final backtest: reports as run_dir/backtest.json; backtest.md with the verdict sentence, the
    format_report table and the stress table (when given); every equity curve (N+1,) marked at `timestamps` as
    <split>_equity.parquet (one column per strategy) and its daily returns as <split>_daily_returns.parquet, so that
    any analysis library (or a new metric) can re-score the run; with `every_series` (name -> run_backtest's series,
    or just {"exposure"}), the per-bar files of write_bar_files; each curve (normalised to 1) to tensorboard as
    equity/<split>_<name> by bar. Returns the text to print."""
    for name, curve in curves.items():
        for i, value in enumerate(curve / curve[0]):
            writer.add_scalar(f"equity/{split}_{name}", value, i)
    index = pd.DatetimeIndex(timestamps, name="timestamp")
    pd.DataFrame(curves, index=index).to_parquet(run_dir / f"{split}_equity.parquet")
    daily = {name: daily_returns(curve, timestamps) for name, curve in curves.items()}
    dates = pd.DatetimeIndex(next(iter(daily.values()))[0], name="date")
    pd.DataFrame({name: r for name, (_, r) in daily.items()}, index=dates).to_parquet(
        run_dir / f"{split}_daily_returns.parquet"
    )
    if every_series is not None:
        write_bar_files(run_dir, split, curves, every_series, timestamps, list(market.data.symbols))
    days = market.data.bars_per_year / market.data.bars_per_day
    head = (
        f"backtest on the {split} split ({market.data.benchmark_name} benchmark; Sharpe and Sortino from daily "
        f"returns, {days:g} days a year; sharpe_bar from bar returns, {market.data.bars_per_year:g} bars a year)"
    )
    text = f"{verdict(reports, f'{split} split', agent)}\n\n{head}:\n\n{format_report(reports, split)}"
    if stress:
        text += "\n\nstress tests (Sharpe, total return in brackets; the final weights, nothing retrained):\n\n"
        text += format_stress(stress)
    (run_dir / "backtest.json").write_text(json.dumps(reports, indent=2, default=float) + "\n")
    (run_dir / "backtest.md").write_text(text + "\n")
    return "\n" + text


def deflated_sharpe(curve: np.ndarray, timestamps: np.ndarray, market: PreparedMarket, trial_sharpes) -> dict:
    """The deflated Sharpe ratio of a backtest (Bailey and Lopez de Prado 2014): P(true Sharpe > SR_0), with SR_0 the
    Sharpe that the best of the trials would reach by luck (expected_max_sharpe over `trial_sharpes`, annualised
    Sharpes of every candidate that could have been picked, e.g. each validation sweep). One trial: the PSR."""
    ann = np.sqrt(market.data.bars_per_year / market.data.bars_per_day)
    trial_sharpes = np.asarray(trial_sharpes, dtype=np.float64)
    sr0 = expected_max_sharpe(trial_sharpes / ann) if len(trial_sharpes) > 1 else 0.0
    _, r = daily_returns(curve, timestamps)
    return {"dsr": probabilistic_sharpe(r, sr0), "dsr_trials": max(len(trial_sharpes), 1), "dsr_sr0": sr0 * ann}


def mean_metrics(reports: list[dict]) -> dict:
    """The mean of each numeric metric over several backtests of one policy (e.g. sampling seeds), with the
    spread of their Sharpe ratios as sharpe_sd."""
    out = {}
    for k in reports[0]:
        values = [r[k] for r in reports if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        out[k] = float(np.mean(values)) if len(values) == len(reports) else None
    out["sharpe_sd"] = float(np.std([r["sharpe"] for r in reports])) if len(reports) > 1 else 0.0
    out["samples"] = len(reports)
    return out


def decile_table(feature: np.ndarray, p_increase: np.ndarray, allowed: np.ndarray) -> list[dict]:
    """P(increase exposure | decile of a feature): over the decisions where an increase (BUY_* or ADD) was allowed,
    the policy's mean probability of choosing one, by decile of the feature's value at the decision."""
    x, p = feature[allowed], p_increase[allowed]
    if len(x) < 10:
        return []
    edges = np.quantile(x, np.linspace(0, 1, 11))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, 9)
    return [
        {
            "decile": d + 1,
            "low": float(edges[d]),
            "high": float(edges[d + 1]),
            "p_increase": float(p[idx == d].mean()),
            "decisions": int((idx == d).sum()),
        }
        for d in range(10)
        if (idx == d).any()
    ]


def format_deciles(rows: list[dict], name: str) -> str:
    """The decile table as Markdown."""
    lines = [
        f"P(increase exposure | decile of {name}), decisions where an increase was allowed:",
        "",
        f"| decile | {name} range | P(increase) | decisions |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['decile']} | {r['low']:.2f} .. {r['high']:.2f} | {r['p_increase']:.3f} | {r['decisions']} |"
        for r in rows
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Pictures of a backtest (matplotlib, imported on first use): equity, drawdown, action mix, per-symbol contribution
# ---------------------------------------------------------------------------------------------------------------------
# One colour per strategy in every picture (the agent or master always blue and drawn thickest).
COLOURS = {
    "agent": "tab:blue", "master": "tab:blue", "always_hold": "tab:gray", "random": "tab:olive",
    "rule_ceiling": "tab:green", "benchmark_bh": "tab:red", "equal_weight_bh": "tab:purple",
    "benchmark_bh_matched": "tab:orange", "equal_weight_bh_matched": "tab:pink", "neutral": "tab:brown",
    "neutral_matched": "tab:orange", "vol_target": "tab:cyan", "defensive": "tab:gray", "best_constant": "tab:olive",
    "best_constant_matched": "tab:pink", "corr_rule": "tab:purple", "reactive_rule": "tab:red", "oracle": "black",
}  # fmt: skip
# Strategies on the agent's own scale: its exposure (matched buy-and-holds) or its trades (random), and cash.
MATCHED = ("agent", "master", "always_hold", "random", "benchmark_bh_matched", "equal_weight_bh_matched",
           "neutral_matched", "best_constant_matched")  # fmt: skip


def _plot_curve(ax, x, y, name: str, lead: str = "agent") -> None:
    mine = name == lead
    ax.plot(x, y, lw=2.2 if mine else 1.0, label=name, color=COLOURS.get(name), zorder=3 if mine else 2)


def backtest_figures(curves: dict[str, np.ndarray], series: dict, symbols: list[str], title: str,
                     lead: str = "agent") -> dict:  # fmt: skip
    """Figures of a backtest, x-axis in the data's timestamps: "equity" (every curve normalised to 1, and below
    them the strategies on the agent's own scale: cash, the random policy at its trade rate and the buy-and-holds
    scaled to its exposure, so that a small book stays legible), "drawdown" (every strategy's), "actions" (share of
    HOLD / increase / decrease among the executed actions, a trading day's centred rolling mean), "contribution"
    (each symbol's cumulative PnL as a fraction of the book). One colour per strategy in every picture (COLOURS).
    curves: name -> equity (N+1,) with `lead` (the agent, or the master) among them; series: run_backtest's series
    of the lead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.asarray(series["timestamps"]).astype("datetime64[ns]")
    figs = {}
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(3, 2))
    for name, curve in curves.items():
        _plot_curve(ax, ts, curve / curve[0], name, lead)
    ax.set_ylabel("equity / initial")
    ax.set_title(f"{title}: equity")
    ax.legend(fontsize=7, ncol=3)
    for name in (n for n in MATCHED if n in curves):
        _plot_curve(ax2, ts, curves[name] / curves[name][0], name, lead)
    ax2.set_ylabel("equity / initial")
    ax2.set_title(f"on the {lead}'s scale: cash, random at its trade rate, buy-and-hold at its exposure", fontsize=9)
    ax2.legend(fontsize=7, ncol=3)
    figs["equity"] = fig
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, curve in curves.items():
        _plot_curve(ax, ts, curve / np.maximum.accumulate(curve) - 1.0, name, lead)
    ax.set_ylabel("drawdown")
    ax.set_title(f"{title}: drawdown")
    ax.legend(fontsize=7, ncol=3)
    figs["drawdown"] = fig
    ex = np.asarray(series["executed"])  # (N, S)
    classes = {"HOLD": ex == HOLD, "increase": np.isin(ex, INCREASE_ACTIONS)}
    classes["decrease"] = np.isin(ex, (SELL_PARTIAL, SELL_ALL))
    window = min(7, max(len(ex), 1))  # one trading day of hourly bars
    fig, ax = plt.subplots(figsize=(10, 3.5))
    # a centred rolling mean over the bars that exist (near the edges, fewer): the three shares always sum to 1
    shares = [
        pd.Series(c.mean(1)).rolling(window, center=True, min_periods=1).mean().to_numpy() for c in classes.values()
    ]
    ax.stackplot(ts[1:], *shares, labels=list(classes), colors=("tab:gray", "tab:green", "tab:red"), alpha=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of executed actions ({window}-bar mean)")
    ax.set_title(f"{title}: action mix")
    ax.legend(fontsize=7, loc="upper right")
    figs["actions"] = fig
    book = float(curves[lead][0])
    cum = np.cumsum(np.asarray(series["pnl"]), axis=0) / book  # (N, S)
    order = np.argsort(cum[-1]) if len(cum) else np.arange(len(symbols))
    show = order if len(symbols) <= 12 else np.r_[order[:5], order[-5:]]
    fig, ax = plt.subplots(figsize=(10, 4))
    for s in show:
        ax.plot(ts[1:], cum[:, s], lw=1.0, label=symbols[s])
    if len(symbols) > 12:
        rest = np.setdiff1d(np.arange(len(symbols)), show)
        ax.plot(ts[1:], cum[:, rest].sum(1), lw=1.0, ls="--", color="grey", label=f"{len(rest)} others")
    ax.set_ylabel("cumulative PnL / book")
    ax.set_title(f"{title}: contribution per symbol")
    ax.legend(fontsize=7, ncol=2)
    figs["contribution"] = fig
    for fig in figs.values():
        fig.autofmt_xdate()
        fig.tight_layout()
    return figs


def decile_figure(rows: list[dict], name: str, title: str):
    """decile_table's rows as a bar chart: P(increase exposure) by decile of the feature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["decile"] for r in rows], [r["p_increase"] for r in rows], color=COLOURS["agent"])
    ax.set_xticks([r["decile"] for r in rows])
    ax.set_xlabel(f"decile of {name} at the decision (1 = lowest)")
    ax.set_ylabel("P(increase exposure)")
    ax.set_title(f"{title}\nP(increase exposure | decile of {name})", fontsize=10)
    fig.tight_layout()
    return fig


def directive_figure(series: dict, market: PreparedMarket, title: str):
    """The master's directives over a backtest (risk multiplier and regime mode, by the data's timestamps) against
    the benchmark's drawdown from its running peak over the same bars. Where the data has hidden edge labels, the
    R periods (the state at each step's decision bar, known only after the fact) are shaded behind the directives,
    so the picture shows the chosen risk level against the hidden edge state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.asarray(series["timestamps"]).astype("datetime64[ns]")[1:]
    coords = np.unravel_index(np.maximum(series["directives"], 0), DIRECTIVE_SHAPE)
    start = series["start"]
    bench = market.data.benchmark[start + 1 : start + 1 + len(ts)]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    edges = edge_labels(market)
    if edges is not None:
        hidden_r = np.asarray(edges[start : start + len(ts)]) == 1
        ax.fill_between(ts, 0, 1, where=hidden_r, step="post", transform=ax.get_xaxis_transform(), color="tab:red",
                        alpha=0.15, lw=0, label="hidden state R (after the fact)")  # fmt: skip
    ax.step(ts, np.take(RISK_MULTIPLIERS, coords[0]), where="post", lw=1.0, label="risk multiplier")
    ax.step(ts, coords[2] - 1.0, where="post", lw=1.0, label="regime mode (-1 defensive, 1 aggressive)")
    ax.set_title(f"{title}: the master's directives")
    ax.legend(fontsize=7)
    ax2.fill_between(ts, bench / np.maximum.accumulate(bench) - 1.0, color="tab:red", alpha=0.4)
    ax2.set_ylabel("benchmark drawdown")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def agent_final_report(make_policy, market: PreparedMarket, args, config: EnvConfig, run_dir, writer, symbols,
                       trials: list) -> dict:  # fmt: skip
    """The final backtest a symbol-agent run ends with (ppo_symbol_agent.py, benchmarks/sb3_learner.py), on
    args.test_split: the agent argmax and args.eval_samples sampled (make_policy as agent_backtests takes it; the
    argmax run is the first call) beside every baseline and the rule ceiling fitted on args.split; the DSR over
    `trials` (the validation Sharpes of the sweeps the weights were picked among, [] for the last weights); with
    args.stress the stress table (the argmax policy again, the 5 largest contributors dropped); the report, the
    per-bar files and the decile table saved and printed, and the pictures. Returns agent_backtests' dict with
    "stress", "figures" and "title" added."""
    print(f"final backtest on the {args.test_split} split: the agent (argmax and {args.eval_samples} sampled), "
          "every baseline and the rule ceiling", flush=True)  # fmt: skip
    tests = agent_backtests(make_policy, market, args.test_split, config, args.seed, args.eval_samples, args.split)
    reports, curves, series = tests["reports"], tests["curves"], tests["series"]
    reports["agent"] |= deflated_sharpe(curves["agent"], series["timestamps"], market, trials)
    stress = None
    if args.stress:  # the final weights under harsher conditions, beside the same baselines
        stress = agent_stress(make_policy(None, None), tests["rule"], market, args.test_split, config, args.seed,
                              contribution=series["pnl"].sum(0), progress=print)  # fmt: skip
    print(save_backtest(run_dir, writer, reports, curves, args.test_split, market, series["timestamps"], stress,
                        "agent", tests["every_series"]))  # fmt: skip
    print(format_deciles(tests["deciles"], "ret_1"))
    title = f"{run_dir.name}, {args.test_split} split"
    figures = backtest_figures(curves, series, symbols, title)
    figures["deciles"] = decile_figure(tests["deciles"], "ret_1", title)
    return tests | {"stress": stress, "figures": figures, "title": title}


def master_final_report(symbols_policy, make_master, market: PreparedMarket, split: str, config: EnvConfig, seed: int,
                        interval: int, stress: bool, run_dir, writer, fitted: dict | None = None,
                        fit_split: str = "train") -> dict:  # fmt: skip
    """mappo_master.py's final backtest on `split`: the master (make_master() -> a fresh directive chooser) beside its
    baselines (master_backtests, fitted on `fit_split` once, the split the master trained on: fit_master_baselines,
    unless `fitted` is given),
    the go criterion, the directive analysis against the hidden regime and edge state (after the fact only), the DSR
    (one trial), the stress table when `stress` (the 5 largest contributors dropped; every row reuses the same
    fitted baselines, nothing is refitted), all saved and printed by save_backtest, the fitted baselines also as
    run_dir/master_baselines.json. Returns {"reports", "results",
    "go", "why", "stress", "fitted"}."""
    if fitted is None:
        fitted = fit_master_baselines(symbols_policy, market, config, seed, interval, split=fit_split)
    reports, results, fitted = master_backtests(symbols_policy, make_master(), market, split, config, seed, interval,
                                                fitted)  # fmt: skip
    series = results["master"]["series"]
    curves = {name: r["curve"] for name, r in results.items()}
    reports["master"] |= deflated_sharpe(curves["master"], series["timestamps"], market, [])
    rows = None
    if stress:  # the final weights under harsher conditions, beside the same fixed and rule-based masters
        S = len(market.data.symbols)
        top = [int(j) for j in np.argsort(-np.abs(series["pnl"].sum(0)))[: min(5, S)]] if S > 1 else []

        def stressed(m, s, cfg, wrap):
            return master_backtests(symbols_policy, make_master(), m, s, cfg, seed, interval, fitted, wrap=wrap)[0]

        rows = stress_tests(stressed, market, split, config, top, print)
    every = {name: r["series"] for name, r in results.items() if "series" in r}
    print(save_backtest(run_dir, writer, reports, curves, split, market, series["timestamps"], rows, "master", every))
    (run_dir / "master_baselines.json").write_text(json.dumps(fitted, indent=2, default=float) + "\n")
    go = master_go_criterion(reports, curves, series["timestamps"], market)
    why = directive_analysis(series, market, reference=fitted["fixed"]["best"])  # defensive: below the best constant
    return {"reports": reports, "results": results, "go": go, "why": why, "stress": rows, "fitted": fitted}


# ---------------------------------------------------------------------------------------------------------------------
# Walk-forward: the folds' test blocks stitched into one out-of-sample record
# ---------------------------------------------------------------------------------------------------------------------
def stitched_metrics(daily: pd.Series, days_per_year: float) -> dict:
    """performance_metrics of a daily return series (D,) compounded from 1 (one mark a day, the day before the
    first return holding the initial mark)."""
    dates = daily.index.to_numpy().astype("datetime64[D]")
    marks = np.r_[dates[0] - 1, dates].astype("datetime64[ns]")
    equity = np.r_[1.0, np.cumprod(1.0 + daily.to_numpy())]
    return performance_metrics(equity, marks, days_per_year, 1.0)


def stitch_daily_returns(daily: list[pd.DataFrame]) -> pd.DataFrame:
    """The folds' daily returns (each (D_k, strategies), in fold order) as one record: a day that two consecutive test
    blocks share (a block boundary inside a session) compounds the two parts, (1 + r_a)(1 + r_b) - 1."""
    stitched = pd.concat(daily)
    if not stitched.index.is_monotonic_increasing:
        raise RuntimeError("stitch_daily_returns: the folds' test blocks are out of order; this is a bug.")
    return (1.0 + stitched).groupby(level=0, sort=False).prod() - 1.0


def walk_forward_report(fold_dirs: list, out_dir, key: str = "agent") -> str:
    """Stitch the folds of a walk-forward (run folders in fold order, each a complete run of a training script on
    its fold's splits) into out_dir: walk_forward.json and .md (a row per fold: its test period, the strategy's
    Sharpe and standard error, each baseline's, the rule ceiling where defined; then the stitched out-of-sample
    record of every strategy: its daily returns, fold after fold, compounded), walk_forward_daily_returns.parquet and
    walk_forward_equity.png. The stitched record's DSR counts as trials every validation sweep of every fold.
    Returns the text to print."""
    from pathlib import Path

    out_dir = Path(out_dir)
    folds, daily, trials = [], [], []
    for k, run in enumerate(map(Path, fold_dirs)):
        summary = json.loads((run / "summary.json").read_text())
        split = summary["args"]["test_split"]
        returns = pd.read_parquet(run / f"{split}_daily_returns.parquet")
        reports = summary["backtest"]
        trials += summary.get("val_sharpes") or []
        folds.append(
            {
                "fold": k,
                "run": run.name,
                "splits": summary["data"]["splits"],
                "test_start": str(returns.index[0].date()),
                "test_end": str(returns.index[-1].date()),
                "days": len(returns),
                "sharpe": {name: r["sharpe"] for name, r in reports.items()},
                "sharpe_se": reports[key]["sharpe_se"],
                "exposure": reports[key].get("exposure"),
                "total_return": reports[key]["total_return"],
                "days_per_year": reports[key]["days_per_year"],
            }
        )
        daily.append(returns)
    days_per_year = folds[0]["days_per_year"]
    stitched = stitch_daily_returns(daily)
    metrics = {name: stitched_metrics(stitched[name], days_per_year) for name in stitched.columns}
    if len(trials) > 1:
        ann = np.sqrt(days_per_year)
        sr0 = expected_max_sharpe(np.asarray(trials) / ann)
        metrics[key] |= {
            "dsr": probabilistic_sharpe(stitched[key].to_numpy(), sr0),
            "dsr_trials": len(trials),
            "dsr_sr0": sr0 * ann,
        }
    fold_sharpes = np.array([f["sharpe"][key] for f in folds])
    best = [
        max(v for n, v in f["sharpe"].items() if n != key and not n.startswith(key) and n not in CEILINGS)
        for f in folds
    ]
    summary = {
        "folds": len(folds),
        "fold_sharpe_mean": float(fold_sharpes.mean()),
        "fold_sharpe_median": float(np.median(fold_sharpes)),
        "folds_positive": int((fold_sharpes > 0).sum()),
        "folds_above_best_baseline": int((fold_sharpes > np.array(best)).sum()),
        "stitched_sharpe": metrics[key]["sharpe"],
        "stitched_sharpe_se": metrics[key]["sharpe_se"],
        "seed_go_sharpe_above_0.6": bool(metrics[key]["sharpe"] > 0.6),
    }
    stitched.to_parquet(out_dir / "walk_forward_daily_returns.parquet")
    record = {"key": key, "folds": folds, "stitched": metrics, "summary": summary, "val_sharpes": trials}
    (out_dir / "walk_forward.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    names = list(stitched.columns)
    lines = [
        f"| fold | test period | days | {key} (se) | " + " | ".join(n for n in names if n != key) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    for f in folds:
        se = f["sharpe_se"]
        cells = " | ".join(f"{f['sharpe'].get(n, float('nan')):.2f}" for n in names if n != key)
        se_text = f" ({se:.2f})" if se is not None else ""
        lines.append(
            f"| {f['fold']} | {f['test_start']} .. {f['test_end']} | {f['days']} | "
            f"{f['sharpe'][key]:.2f}{se_text} | {cells} |"
        )
    text = "\n".join(
        [
            verdict(metrics, "stitched out-of-sample record", key),
            "",
            f"walk-forward, {len(folds)} folds (each trained from scratch on its own train split, its weights "
            "picked on its own validation split, graded on its test block); Sharpe from daily returns:",
            "",
            *lines,
            "",
            "the stitched out-of-sample record (every fold's test block, compounded):",
            "",
            format_report(metrics, "stitched"),
            "",
            f"{key}: mean fold Sharpe {summary['fold_sharpe_mean']:.2f} (median {summary['fold_sharpe_median']:.2f}), "
            f"positive in {summary['folds_positive']} of {len(folds)} folds, above the best baseline in "
            f"{summary['folds_above_best_baseline']}",
        ]
    )
    (out_dir / "walk_forward.md").write_text(text + "\n")
    fig = walk_forward_figure(stitched, [f["test_start"] for f in folds], key, out_dir.name)
    fig.savefig(out_dir / "walk_forward_equity.png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "\n" + text


def walk_forward_figure(stitched: pd.DataFrame, starts: list[str], key: str, title: str):
    """The stitched out-of-sample equity of every strategy (daily, from 1), fold boundaries as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name in stitched.columns:
        _plot_curve(ax, stitched.index, np.cumprod(1.0 + stitched[name].to_numpy()), name, key)
    for start in starts[1:]:
        ax.axvline(pd.Timestamp(start), color="grey", ls=":", lw=1)
    ax.set_ylabel("equity / initial (each fold's test block, compounded)")
    ax.set_title(f"{title}: walk-forward, out of sample")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Explanations (--explain): integrated-gradients saliency of the chosen action over the technical window, and the
# agent's direction against the supervised prior's (SL vs RL), on the decisions of one argmax sweep of a split
# ---------------------------------------------------------------------------------------------------------------------
IG_STEPS = 64  # trapezoid intervals of the integrated-gradients path integral
EXPLAIN_DECISIONS = 2048  # about this many decisions get a saliency map: whole bars drawn at random, all S symbols each
# Direction of each action: +1 adds exposure (BUY_*, ADD), -1 removes it (SELL_*), 0 holds (ppo_symbol_agent's
# ACTION_DIRECTION, which builds the supervised prior; a test keeps the two equal).
ACTION_SIGN = np.zeros(len(ACTION_NAMES), dtype=np.int64)
ACTION_SIGN[INCREASE_ACTIONS], ACTION_SIGN[[SELL_PARTIAL, SELL_ALL]] = 1, -1
DIRECTION_NAMES = {1: "buy", 0: "hold", -1: "sell"}


def integrated_gradients(fn, x, baseline=None, steps: int = IG_STEPS):
    """Integrated gradients (Sundararajan, Taly and Yan 2017, eq. 1) of fn at x against `baseline` (zeros if None):
    (x - baseline) times the mean gradient of fn along the straight path from the baseline to x, the path integral
    taken with the trapezoidal rule over `steps` intervals (steps + 1 forward and backward passes, each batched).

    x: float tensor (*items, *block); fn(x) -> (*items,), each output reading only its own block of x (one backward
    pass of the sum then gives every item's gradient: the symbol agents' encoder encodes each window on its own).
    Returns (attributions shaped as x, fn(x) (*items,), fn(baseline) (*items,)), detached. Completeness: the
    attributions of an item sum to fn(x) - fn(baseline) up to the quadrature error: O(1 / steps^2) for a smooth fn,
    O(1 / steps) where the gradient jumps (ReLU kinks)."""
    import torch

    base = torch.zeros_like(x) if baseline is None else torch.broadcast_to(baseline, x.shape).to(x)
    grad_sum = torch.zeros_like(x)
    for k, alpha in enumerate(torch.linspace(0.0, 1.0, steps + 1).tolist()):
        point = (base + alpha * (x - base)).detach().requires_grad_(True)
        out = fn(point)
        (grad,) = torch.autograd.grad(out.sum(), point)
        grad_sum += grad * (0.5 if k in (0, steps) else 1.0)
        if k == 0:
            at_base = out.detach()
    return (x - base) * grad_sum / steps, out.detach(), at_base


def decision_saliency(get_logits, obs: dict[str, np.ndarray], device, steps: int = IG_STEPS, windows: int = 512):
    """Integrated gradients of the chosen action's logit (the argmax of the masked logits) over the technical window of
    every decision in obs (numpy arrays (B, S, ...) as the env returns them, B bars of S symbols), from a zero window
    with every other part of the observation held at its value. get_logits: torch obs dict (B, S, ...) -> masked
    logits (B, S, 7). Bars go through in chunks of about `windows` windows. Returns numpy (attributions (B, S, L, F),
    chosen actions (B, S), logit at x (B, S), logit at the baseline (B, S))."""
    import torch

    B, S = obs["technical"].shape[:2]
    rows = max(1, windows // S)
    out = []
    for lo in range(0, B, rows):
        part = {k: torch.as_tensor(v[lo : lo + rows], device=device) for k, v in obs.items()}
        with torch.no_grad():
            action = get_logits(part).argmax(-1)  # (b, S)
        onehot = torch.nn.functional.one_hot(action, len(ACTION_NAMES)).float()  # a product: no gather in backward

        def chosen_logit(tech, part=part, onehot=onehot):
            return (get_logits(part | {"technical": tech}) * onehot).sum(-1)  # (b, S)

        attr, at_x, at_base = integrated_gradients(chosen_logit, part["technical"].float(), steps=steps)
        out.append([a.cpu().numpy() for a in (attr, action, at_x, at_base)])
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def prior_direction(sl_mean: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Direction (+1 buy, 0 hold, -1 sell) of the supervised prior's most likely action among the allowed ones:
    the prior's logits are temperature x direction x (mean sl_prob - 0.5) (ppo_symbol_agent.sl_prior_logprobs), so
    buy where the mean probability is over 1/2 and a buy (or ADD) is allowed, sell where it is under 1/2 and a sell is
    allowed, hold otherwise (at exactly 1/2 every allowed action ties and HOLD, action 0, is taken).
    sl_mean (...), mask (..., 7) bool -> (...) int64."""
    logits = np.where(mask, (sl_mean[..., None] - 0.5) * ACTION_SIGN, -np.inf)
    return ACTION_SIGN[logits.argmax(-1)]


def _mean_se(x: np.ndarray) -> tuple[float | None, float | None, int]:
    """(mean, standard error, count) over the finite values of x; None where there are too few."""
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return None, None, 0
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None, len(x)


def _decision_outcomes(sweep: dict, market: PreparedMarket, config: EnvConfig) -> tuple[np.ndarray, np.ndarray]:
    """What followed each decision of a run_backtest sweep (n bars x S symbols), NaN where the split ends first:
    the symbol's return from the decision's fill to the next fill, px[t+2] / px[t+1] - 1 with px the fill price
    (open, or close with fill="close"; fit_rule's convention), and the env's realised PnL of the symbol's account
    over the bar after the fill (run_backtest's pnl of step i + 1, net of the costs paid on that step), as a fraction
    of the account's initial capital. Returns (forward return (n, S), next-bar PnL (n, S))."""
    pnl, start = sweep["series"]["pnl"], sweep["series"]["start"]
    n = len(pnl)
    t = start + np.arange(n - 1)  # decisions whose next bar is inside the sweep
    px = market.data.open if config.fill == "open" else market.data.close
    fwd, nxt = np.full(pnl.shape, np.nan), np.full(pnl.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        fwd[:-1] = px[t + 2] / px[t + 1] - 1.0
    fwd[~np.isfinite(fwd)] = np.nan
    nxt[:-1] = pnl[1:] / float(config.initial_capital)
    return fwd, nxt


def sl_vs_rl(action: np.ndarray, mask: np.ndarray, sl_mean: np.ndarray, fwd: np.ndarray, pnl_next: np.ndarray) -> dict:
    """The agent's directions against the supervised prior's on the decisions with a choice (more than one allowed
    action): arrays (n, S) of the agent's actions, the mean sl_prob, _decision_outcomes' forward return and
    next-bar PnL, and the masks (n, S, 7). Returns {"decisions", "agreement" (share), "table" (agent direction ->
    prior direction -> count), "groups": agree / disagree -> {n, fwd_bp (mean forward return of the symbol, basis
    points), signed_bp and signed_se_bp (the same signed by the agent's direction: what its choice earned per unit
    of direction), pnl_bp (the env's next-bar PnL, basis points of the account's capital)}}."""
    choice = mask.sum(-1) > 1
    agent, prior = ACTION_SIGN[action][choice], prior_direction(sl_mean, mask)[choice]
    fwd, pnl_next = fwd[choice], pnl_next[choice]
    table = {DIRECTION_NAMES[a]: {DIRECTION_NAMES[p]: int(((agent == a) & (prior == p)).sum()) for p in (1, 0, -1)}
             for a in (1, 0, -1)}  # fmt: skip
    groups = {}
    for name, sel in (("agree", agent == prior), ("disagree", agent != prior)):
        signed, signed_se, _ = _mean_se(1e4 * agent[sel] * fwd[sel])
        groups[name] = {
            "n": int(sel.sum()),
            "fwd_bp": _mean_se(1e4 * fwd[sel])[0],
            "signed_bp": signed,
            "signed_se_bp": signed_se,
            "pnl_bp": _mean_se(1e4 * pnl_next[sel])[0],
        }
    n = int(choice.sum())
    return {"decisions": n, "agreement": float((agent == prior).mean()) if n else None, "table": table,
            "groups": groups}  # fmt: skip


def explain_decisions(
    get_logits,
    market: PreparedMarket,
    split: str,
    config: EnvConfig,
    seed: int,
    device="cpu",
    decisions: int = EXPLAIN_DECISIONS,
    steps: int = IG_STEPS,
) -> dict:
    """Why an independent-mode agent acts as it does on `split`: one argmax sweep (run_backtest, the same actions as
    the report's argmax backtest) records every decision; on ceil(decisions / S) bars drawn at random (seed) the
    chosen action's logit is attributed to the lookback bars and features of its technical window (decision_saliency),
    and every decision's direction is set against the supervised prior's (sl_vs_rl; None where sl_probs is constant
    on the split, i.e. the data has no supervised signals). get_logits: torch obs dict (B, S, ...) -> masked logits
    (B, S, 7). Returns {"saliency": mean |attribution| over the sampled decisions with a choice (L, F), "share": its
    share of the total (L, F), "feature_names", "decisions", "bars", "symbols", "steps", "completeness_gap" and
    "completeness_gap_mean" (the largest and the mean |sum of a decision's attributions - (logit(x) -
    logit(baseline))|), "logit_change" (the mean |logit(x) - logit(baseline)|), "sl" (sl_vs_rl's result or None),
    "sl_constant" (the constant value or None), "sweep" (per decision (n, S): action, mask, sl_mean, fwd, pnl_next;
    and start), "total_return" (the sweep's), "split", "seed"}."""
    import torch

    lo, hi = market.splits[split]
    S, n = market.technical.shape[1], max(hi - 1 - max(lo, market.lookback - 1), 1)  # the sweep's bars, as the core
    keep = set(np.random.default_rng(seed).choice(n, size=min(-(-decisions // S), n), replace=False).tolist())
    record = {"action": [], "mask": [], "sl_mean": []}
    kept = []

    def act(obs):  # the argmax policy, recording each decision and the whole observation of the sampled bars
        with torch.no_grad():
            action = get_logits({k: torch.as_tensor(v, device=device) for k, v in obs.items()}).argmax(-1)
        action = action.cpu().numpy()  # (1, S)
        if len(record["action"]) in keep:
            kept.append({k: v[0].copy() for k, v in obs.items()})  # the env reuses its buffers
        record["action"].append(action[0])
        record["mask"].append(obs["action_mask"][0] != 0)
        record["sl_mean"].append(obs["sl_probs"][0].mean(-1))
        return action

    sweep = run_backtest(act, market, split, config, seed)
    rec = {k: np.stack(v) for k, v in record.items()}  # (n, S), mask (n, S, 7)
    rec["fwd"], rec["pnl_next"] = _decision_outcomes(sweep, market, config)
    rec["start"] = sweep["series"]["start"]

    obs = {k: np.stack([o[k] for o in kept]) for k in kept[0]}  # (B, S, ...)
    attr, _, at_x, at_base = decision_saliency(get_logits, obs, device, steps)
    choice = obs["action_mask"].sum(-1) > 1  # (B, S) decisions with more than one allowed action
    saliency = np.abs(attr[choice]).mean(0) if choice.any() else np.zeros(attr.shape[2:])  # (L, F)
    gap = np.abs(attr.sum((-2, -1)) - (at_x - at_base))
    names = list(market.feature_names) or [f"feature {j}" for j in range(attr.shape[-1])]
    sl_values = rec["sl_mean"]
    constant = float(sl_values.flat[0]) if np.ptp(sl_values) == 0 else None
    sl = None if constant is not None else sl_vs_rl(rec["action"], rec["mask"], sl_values, rec["fwd"], rec["pnl_next"])
    return {
        "saliency": saliency,
        "share": saliency / saliency.sum() if saliency.sum() > 0 else saliency,
        "feature_names": names,
        "decisions": int(choice.sum()),
        "bars": len(kept),
        "symbols": S,
        "steps": steps,
        "completeness_gap": float(gap.max()),
        "completeness_gap_mean": float(gap.mean()),
        "logit_change": float(np.abs(at_x - at_base).mean()),
        "sl": sl,
        "sl_constant": constant,
        "sweep": rec,
        "total_return": sweep["agent"]["total_return"],
        "split": split,
        "seed": seed,
    }


def format_explanation(explained: dict, top: int = 10) -> str:
    """explain_decisions' result as Markdown: the method, the top `top` (lag, feature) cells with their share of
    the total attribution, the share on ret_1 at the decision bar, the shares by feature, and the SL vs RL section."""
    share, names, split = explained["share"], explained["feature_names"], explained["split"]
    L = share.shape[0]
    order = np.argsort(share, axis=None)[::-1][:top]
    lines = [
        f"## Saliency: what the chosen action reads in the technical window ({split} split)",
        "",
        f"Integrated gradients (Sundararajan, Taly and Yan 2017) of the chosen action's logit (the argmax of the "
        f"masked policy) with respect to the technical window ({L} bars x {len(names)} features), from a zero "
        f"baseline window (each feature at its rolling mean: the features are rolling z-scores) with the rest of the "
        f"observation held at its value; {explained['steps']} trapezoid steps. Completeness: each decision's "
        f"attributions sum to logit(x) - logit(baseline) within {explained['completeness_gap']:.2g} (the largest "
        f"gap; {explained['completeness_gap_mean']:.2g} on average, against a mean |logit(x) - logit(baseline)| "
        f"of {explained['logit_change']:.3g}; the ReLU kinks of the heads make the quadrature error fall as "
        "1 / steps).",
        "",
        f"Decisions: {explained['decisions']} with a choice (more than one allowed action) on {explained['bars']} "
        f"bars of the {split} split drawn at random (seed {explained['seed']}), all {explained['symbols']} symbols "
        f"of each bar; aggregated as the mean |attribution| per (lag, feature), given as shares of the total.",
        "",
    ]
    if "ret_1" in names:
        lines += [f"Share on ret_1 at the decision bar (lag 0): {share[L - 1, names.index('ret_1')]:.1%}.", ""]
    lines += ["| rank | lag (bars before the decision) | feature | share |", "|---|---|---|---|"]
    for rank, cell in enumerate(order, 1):
        row, col = np.unravel_index(cell, share.shape)
        lines.append(f"| {rank} | {L - 1 - row} | {names[col]} | {share[row, col]:.1%} |")
    by_feature = share.sum(0)
    lines += ["", "By feature (summed over the lags): " + ", ".join(
        f"{names[j]} {by_feature[j]:.1%}" for j in np.argsort(by_feature)[::-1][:5]) + "."]  # fmt: skip
    lines += ["", "## SL vs RL: the agent's direction against the supervised prior's", ""]
    sl = explained["sl"]
    if sl is None:
        lines.append(
            f"No comparison: sl_probs is constant ({explained['sl_constant']:g}) on the {split} split, so the data "
            "has no supervised signals (as --data.no-sl-signals prepares it) and the prior has no direction."
        )
        return "\n".join(lines)
    lines += [
        f"Every decision with a choice of the argmax sweep of the {split} split ({sl['decisions']}). The agent's "
        "direction: buy (BUY_* or ADD), sell (SELL_*) or hold. The prior's: that of its most likely allowed action "
        "(buy where the mean sl_prob is over 1/2 and a buy is allowed, sell where it is under 1/2 and a sell is "
        "allowed, hold otherwise). They agree on "
        + (f"{sl['agreement']:.1%} of the decisions." if sl["agreement"] is not None else "no decision."),
        "",
        "| agent \\ prior | buy | hold | sell |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | " + " | ".join(str(c) for c in row.values()) + " |" for a, row in sl["table"].items()]
    lines += [
        "",
        "What followed, after the decision: the symbol's return from the decision's fill (the next bar) to the next "
        "fill, its mean and signed by the agent's direction (what the choice earned per unit of direction; hold "
        "counts 0), and the env's realised PnL of the symbol's account over the bar after the fill (net of the "
        "costs paid on that step), in basis points of the account's capital. The sweep's total return is "
        f"{explained['total_return']:.4%} (the report's argmax agent).",
        "",
        "| decisions | n | forward return (bp) | signed by the agent (bp, +- s.e.) | env PnL next bar (bp) |",
        "|---|---|---|---|---|",
    ]
    for name, g in sl["groups"].items():
        signed = "n/a" if g["signed_bp"] is None else f"{g['signed_bp']:+.2f}"
        signed += "" if g["signed_se_bp"] is None else f" +- {g['signed_se_bp']:.2f}"
        cells = ["n/a" if g[k] is None else f"{g[k]:+.2f}" for k in ("fwd_bp", "pnl_bp")]
        lines.append(f"| {name} | {g['n']} | {cells[0]} | {signed} | {cells[1]} |")
    return "\n".join(lines)


def save_explanation(run_dir, explained: dict) -> str:
    """Write explain_decisions' result to run_dir: explain.md (format_explanation) and explain.json (the figures,
    the saliency grid (L, F) by lag from the oldest bar to the decision bar, and the shares). Returns the text."""
    text = format_explanation(explained)
    keep = ("feature_names", "decisions", "bars", "symbols", "steps", "completeness_gap", "completeness_gap_mean",
            "logit_change", "sl", "sl_constant", "total_return", "split", "seed")  # fmt: skip
    out = {k: explained[k] for k in keep} | {k: explained[k].tolist() for k in ("saliency", "share")}
    (Path(run_dir) / "explain.json").write_text(json.dumps(out, indent=2) + "\n")
    (Path(run_dir) / "explain.md").write_text(text + "\n")
    return "\n" + text


def saliency_figure(explained: dict, title: str):
    """explain_decisions' share grid as a heat map: lags (0 = the decision bar, at the top) by features (named)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share, names = explained["share"], explained["feature_names"]
    L, F = share.shape
    fig, ax = plt.subplots(figsize=(12, 7.5), layout="constrained")  # room for the rotated feature names
    image = ax.imshow(100 * share[::-1], aspect="auto", cmap="viridis")  # row r = lag r
    ax.set_yticks(range(L))
    ax.set_yticklabels(range(L), fontsize=7)
    ax.set_xticks(range(F))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("lag: bars before the decision (0 = the decision bar)")
    fig.colorbar(image, ax=ax, label="share of the total mean |attribution| (%)")
    ax.set_title(
        f"{title}\nintegrated gradients of the chosen action's logit: mean |attribution| over "
        f"{explained['decisions']} decisions ({explained['steps']} steps, zero baseline)",
        fontsize=10,
    )
    return fig
