"""MAPPO for the master agent: a portfolio manager whose directives steer the symbol agents, trained on the core.

The S symbols of each env share one account (portfolio mode). Every ``master_interval`` bars (7 = one trading day)
the master picks one of the 48 directives of the 4 x 4 x 3 grid (risk multiplier, concentration level, regime mode;
the table is `VecTradingCore`'s docstring); in between, the symbol agents act every bar under that directive, which
enters their observation and changes their sizes and masks. Both levels are updated with PPO-clip:

  - symbol agents: one shared encoder and batched heads (parameter sharing), optionally initialised from a
    ``ppo_symbol_agent.py`` checkpoint (--symbol-checkpoint; the directive inputs start at zero weight, so the loaded
    policy acts exactly as it did) and optionally frozen (--freeze-symbols); their own per-slot rewards and critics.
  - master: actor on pooled symbol embeddings + portfolio/regime features + the current directive + the symbols'
    last actions; centralised critic that also sees the env's global state (`VecTradingCore.state()`), with
    PopArt-lite value normalisation (running mean / std of the returns; the critic predicts normalised values).

One rollout: T bars x E envs; the master's batch holds its T / master_interval decisions per env. Master reward of
one decision, over the bars until the next one (or the episode's end), with r the account's bar returns, b the
benchmark's, dd the drawdown from the episode peak and w the position weights (x 100 = percent units):

    risk_adjusted   = 100 * (sum r - risk_coef * sqrt(sum r^2))        return minus realised volatility
    diversification = div_coef * mean over bars of (1 - sum w^2) / (1 - 1/S)     (0 when flat)
    drawdown        = -dd_coef * 100 * sum max(0, dd_t - dd_{t-1})         every new loss below the peak
    excess          = excess_coef * 100 * (sum r - sum b)                   return over the benchmark
    reward = risk_adjusted + diversification + drawdown + excess           (each logged as master_reward/<name>)

    python mappo_master.py --seed 1
    python mappo_master.py --symbol-checkpoint runs/<ppo run>/checkpoint.pt --freeze-symbols
    torchrun --standalone --nproc_per_node 2 mappo_master.py --num-envs 4     # data parallel

The run ends with a backtest on the test split: learned master vs the fixed neutral directive vs a fixed defensive
directive vs buy-and-hold, and the drawdown reduction against neutral (the seeds' go criterion: > 15%).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

from encoders import EncoderConfig, MasterNetwork, SymbolPolicy, load_checkpoint, masked_policy, save_checkpoint
from market_data import DataConfig, prepare_market
from trading_env import DIRECTIVE_SHAPE, NEUTRAL_DIRECTIVE, NUM_DIRECTIVES, EnvConfig, VecTradingCore

ACTION_NAMES = ("HOLD", "BUY_SMALL", "BUY_MEDIUM", "BUY_LARGE", "SELL_PARTIAL", "SELL_ALL", "ADD")
CPU_ENCODER = {"kind": "mlp", "d_model": 128, "output_dim": 128}
# per-step info arrays (E, S) averaged over each rollout
TELEMETRY_KEYS = ("masked_attempt", "forced_hold", "voluntary_trade", "violations", "diversity_bonus", "cost", "equity")
TELEMETRY_KEYS += ("exposure",)
MASTER_REWARD_COMPONENTS = ("risk_adjusted", "diversification", "drawdown", "excess")
DEFENSIVE_DIRECTIVE = int(np.ravel_multi_index((0, 0, 0), DIRECTIVE_SHAPE))  # risk 0.5, tightest level, defensive
# tensorboard tag -> MLflow metric name fixed by the seeds (Stage 5 telemetry); other tags keep their own name.
MLFLOW_NAMES = {
    "charts/policy_action_entropy_mean": "policy_action_entropy_mean",
    "charts/executed_action_entropy_mean": "executed_action_entropy_mean",
    "charts/voluntary_trade_rate": "voluntary_trade_rate_mean",
    "charts/sanitizer_trade_delta": "sanitizer_trade_delta_mean",
    "charts/ep_unique_actions": "ep_unique_actions_mean",
    "charts/diversity_bonus": "ep_diversity_bonus_mean",
}


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (first part of the run folder's name)"""
    seed: int = 1
    """seed of the training run (python, numpy, torch, environments); rank r of torchrun uses seed + r"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` and deterministic torch algorithms"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    torch_threads: int = 1
    """torch intra-op threads (0: torch's default). 1 by default: the small batches gain little from more, and on a
    busy 2-core machine two spinning threads made rollouts ~10x slower in our measurements"""
    track: bool = False
    """if toggled, the metrics are also sent to MLflow (local ./mlruns, needs `pip install mlflow`)"""
    save_model: bool = False
    """if toggled, runs/<run>/checkpoint.pt is written at every evaluation and at the end (resumable)"""
    resume: str | None = None
    """path of a checkpoint.pt of this script to continue from (both networks, optimiser, value norm, RNG, envs)"""
    run_dir: str = "runs"
    """folder that holds the run folders"""
    encoder_preset: Literal["auto", "cpu", "as_given"] = "auto"
    """auto: `as_given` on CUDA, `cpu` otherwise; cpu: the --encoder.* fields left at their defaults become an MLP
    encoder (d_model 128, output_dim 128); as_given: the --encoder.* fields as they are (defaults: the seed's
    transformer, d_model 256, 8 heads, 4 layers, output_dim 256)"""
    symbol_checkpoint: str | None = None
    """checkpoint.pt of ppo_symbol_agent.py to initialise the symbol agents (its encoder settings are used)"""
    freeze_symbols: bool = False
    """if toggled, the symbol agents are not updated: only the master learns"""

    # --- environment ---
    data: DataConfig = field(default_factory=DataConfig)
    """market data: synthetic market or the user's files, features, splits"""
    env: EnvConfig = field(default_factory=lambda: EnvConfig(episode_length=280))
    """trading environment: capital, costs, slippage, limits, reward weights (episodes of 280 bars = 40 trading days,
    a whole number of master decisions)"""
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(dropout=0.0))
    """encoder sizes (used as given with --encoder-preset custom; dropout 0 keeps PPO's ratio exact)"""
    split: str = "train"
    """split the agents train on (random episode starts inside it)"""
    eval_split: str = "val"
    """split of the periodic deterministic evaluation (a sequential sweep)"""
    eval_interval: int = 10
    """evaluate (and checkpoint with --save-model) every this many iterations; 0 disables periodic evaluation"""
    test_split: str = "test"
    """split of the final backtest"""
    master_interval: int = 7
    """bars between two master decisions (7 hourly bars = one trading day)"""

    # --- algorithm (symbol agents, CleanRL's names) ---
    total_timesteps: int = 600_000
    """total symbol-steps of the experiment (all ranks together)"""
    learning_rate: float = 3e-4
    """the learning rate of the symbol agents' optimizer"""
    num_envs: int = 16
    """the number of parallel environments per rank (each one account trading all symbols)"""
    num_steps: int = 70
    """the number of bars per environment per rollout (a multiple of master_interval)"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for both levels"""
    gamma: float = 0.99
    """the discount factor gamma of the symbol agents (per bar)"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation of the symbol agents"""
    num_minibatches: int = 4
    """the number of mini-batches of both levels (split over env-steps; each keeps all S symbols)"""
    update_epochs: int = 4
    """the K epochs to update the policies"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.03
    """entropy coefficient of the symbol agents (the Stage-5 floor; the full entropy stack is ppo_symbol_agent.py's)"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold (stops the epochs of an update early)"""

    # --- algorithm (master) ---
    master_learning_rate: float = 3e-4
    """the learning rate of the master network"""
    master_gamma: float = 0.95
    """discount per master decision (per trading day)"""
    master_gae_lambda: float = 0.95
    """GAE lambda over master decisions"""
    master_ent_coef: float = 0.01
    """entropy coefficient of the master's directive distribution"""
    value_norm: bool = True
    """normalise the centralised critic's targets by a running mean / std of the returns (PopArt-lite)"""
    risk_coef: float = 0.5
    """master reward: weight of the realised volatility subtracted from the return"""
    div_coef: float = 0.05
    """master reward: weight of the diversification term"""
    dd_coef: float = 2.0
    """master reward: weight of the drawdown penalty (new losses below the episode peak)"""
    excess_coef: float = 0.5
    """master reward: weight of the return in excess of the benchmark"""

    # --- filled in at runtime ---
    num_symbols: int = 0
    """symbols per environment (from the data)"""
    batch_size: int = 0
    """symbol-steps per rollout per rank (num_steps * num_envs * num_symbols)"""
    master_batch_size: int = 0
    """master decisions per rollout per rank (num_steps / master_interval * num_envs)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""
    world_size: int = 1
    """torchrun processes"""


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: value normalisation, master reward, inputs and advantages (unit-tested in tests/test_mappo.py)
# ---------------------------------------------------------------------------------------------------------------
class ValueNorm(nn.Module):
    """Running mean and variance of the critic's targets (Chan et al.'s parallel update over batches). The critic
    predicts normalised values; GAE uses denormalised ones (MAPPO's ValueNorm, PopArt without the output rescale)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("count", torch.full((), 1e-4))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).double()
        n, mean, var = x.numel(), x.mean(), x.var(unbiased=False)
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean.copy_(self.mean + delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.sqrt(self.var + 1e-8)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(self.var + 1e-8) + self.mean


def master_reward(acc: dict, args: Args, num_symbols: int) -> dict:
    """Components (E,) of the master's reward from one decision's accumulators (E,): ret (sum of account bar
    returns), ret_sq (sum of their squares), bench (sum of benchmark bar returns), dd_up (sum of drawdown increases),
    div (sum of 1 - Herfindahl of the position weights, 0 when flat), bars (bars counted)."""
    div_max = 1.0 - 1.0 / num_symbols if num_symbols > 1 else 1.0
    return {
        "risk_adjusted": 100.0 * (acc["ret"] - args.risk_coef * np.sqrt(acc["ret_sq"])),
        "diversification": args.div_coef * acc["div"] / np.maximum(acc["bars"], 1) / div_max,
        "drawdown": -args.dd_coef * 100.0 * acc["dd_up"],
        "excess": args.excess_coef * 100.0 * (acc["ret"] - acc["bench"]),
    }


def herfindahl_complement(size_fraction: np.ndarray) -> np.ndarray:
    """Position weights (E, S) as fractions of equity -> 1 - sum of squared normalised weights (E,), 0 when flat."""
    total = size_fraction.sum(1)
    share = np.divide(size_fraction, total[:, None], out=np.zeros_like(size_fraction), where=total[:, None] > 0)
    return np.where(total > 0, 1.0 - (share * share).sum(1), 0.0)


def global_features(obs: dict, directive_index: np.ndarray, last_actions: np.ndarray) -> np.ndarray:
    """The master actor's portfolio-level input (E, 36): the account's portfolio features (8), the regime (10), the
    current directive as one-hot grid coordinates (4 + 4 + 3), and the share of symbols whose last policy action was
    each of the 7 actions (the symbol agents' intents)."""
    E = len(directive_index)
    parts = [obs["portfolio"][:, 0], obs["regime"][:, 0]]
    for coord, n in zip(np.unravel_index(directive_index, DIRECTIVE_SHAPE), DIRECTIVE_SHAPE, strict=True):
        one_hot = np.zeros((E, n), np.float32)
        one_hot[np.arange(E), coord] = 1.0
        parts.append(one_hot)
    parts.append((last_actions[..., None] == np.arange(len(ACTION_NAMES))).mean(1))
    return np.concatenate(parts, axis=1).astype(np.float32)


def state_from_obs(envs: VecTradingCore, obs: dict) -> np.ndarray:
    """The env's global state (E, state_dim) evaluated on an observation dict such as info["final_obs"]: state()
    reads only the observation buffers, so it is evaluated on a stand-in holding `obs`."""
    if obs is envs.obs:
        return envs.state()
    stand_in = type("StateView", (), {"obs": obs, "mode": envs.mode, "num_envs": envs.num_envs})()
    return VecTradingCore.state(stand_in)


def compute_gae(rewards, values, terminated, truncated, final_values, next_value, gamma, gae_lambda):
    """GAE over a rollout whose steps may end episodes (same-step autoreset).

    rewards, values, terminated, truncated, final_values: (T, ...); step t's outcome. final_values[t] = V(final obs)
    of the episode that ended by truncation at t. next_value: (...) value of the observation after the last step.
    At truncation the ended episode's value is bootstrapped into the reward, r + gamma * V(final_obs), and the
    recursion is cut as at a termination (where nothing is bootstrapped). Returns (advantages, returns).
    """
    trunc_only = truncated.float() * (1.0 - terminated.float())
    rewards = rewards + gamma * final_values * trunc_only
    nonterminal = 1.0 - torch.maximum(terminated.float(), truncated.float())
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nonterminal[t] - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nonterminal[t] * lastgaelam
    return advantages, advantages + values


def slot_action_entropy(actions: np.ndarray) -> np.ndarray:
    """(T, E, S) actions -> (E, S) entropy (nats) of each slot's empirical action distribution over T."""
    counts = (actions[..., None] == np.arange(len(ACTION_NAMES))).mean(0)  # (E, S, 7)
    return -(counts * np.log(np.where(counts > 0, counts, 1.0))).sum(-1)


def load_symbol_agents(path: str, num_symbols: int, directive_dim: int = 4) -> tuple[SymbolPolicy, EncoderConfig]:
    """Symbol agents initialised from a ppo_symbol_agent.py checkpoint (independent mode, no directive input).

    The checkpoint's encoder settings and head layout are used. The directives are extra inputs of the heads' first
    layers: their weight rows start at zero, so the loaded agents act exactly as the checkpoint did until the MAPPO
    updates teach them to read the master's orders."""
    payload = load_checkpoint(path)
    saved, saved_args = payload["model"], payload["args"] or {}
    if "encoder" not in saved_args or "actor.weights.0" not in saved:
        raise ValueError(f"{path} is not a ppo_symbol_agent.py checkpoint (no encoder args or symbol heads in it).")
    encoder = EncoderConfig(**saved_args["encoder"])
    heads = saved["actor.weights.0"].shape[0]
    if heads not in (1, num_symbols):
        raise ValueError(
            f"{path} holds per-symbol heads for {heads} symbols but the data has {num_symbols}; train the symbol "
            "agents on the same universe (--data.* flags) or start without --symbol-checkpoint."
        )
    agent = SymbolPolicy(num_symbols, encoder, shared_heads=heads == 1 and num_symbols > 1, directive_dim=directive_dim)
    own = agent.state_dict()
    for key in ("actor.weights.0", "critic.weights.0"):  # (H, D, hidden) -> (H, D + directive_dim, hidden)
        w = saved[key]
        if w.shape[1] + directive_dim == own[key].shape[1]:
            saved[key] = torch.cat([w, torch.zeros(w.shape[0], directive_dim, w.shape[2], dtype=w.dtype)], dim=1)
    bad = sorted(set(own) ^ set(saved)) + [k for k in own if k in saved and own[k].shape != saved[k].shape]
    if bad:
        raise ValueError(f"{path} does not fit SymbolPolicy({num_symbols}, {encoder.kind}): mismatched keys {bad}.")
    agent.load_state_dict(saved)
    return agent, encoder


# ---------------------------------------------------------------------------------------------------------------
# Backtest metrics (the same definitions as ppo_symbol_agent.py)
# ---------------------------------------------------------------------------------------------------------------
def performance_metrics(equity: np.ndarray, periods_per_year: float) -> dict:
    """Equity curve (N+1,) that starts at the initial capital -> return, risk and drawdown metrics.

    Sharpe and Sortino annualise per-bar simple returns with sqrt(periods_per_year) (risk-free rate 0); CAGR uses
    N / periods_per_year years; the drawdown duration is the longest stretch of bars below a previous peak.
    """
    equity = np.asarray(equity, dtype=np.float64)
    r = equity[1:] / equity[:-1] - 1.0
    growth = equity[-1] / equity[0]
    years = max(len(r) / periods_per_year, 1e-12)
    std = r.std(ddof=1) if len(r) > 1 else 0.0
    downside = np.sqrt(np.mean(np.minimum(r, 0.0) ** 2)) if len(r) else 0.0
    drawdown = equity / np.maximum.accumulate(equity) - 1.0
    edges = np.flatnonzero(np.diff(np.r_[0, (drawdown < 0).astype(np.int8), 0]))  # starts and ends of drawdowns
    cagr = growth ** (1.0 / years) - 1.0 if growth > 0 else -1.0
    max_dd = float(drawdown.min())
    return {
        "total_return": float(growth - 1.0),
        "cagr": float(cagr),
        "sharpe": float(r.mean() / std * np.sqrt(periods_per_year)) if std > 0 else 0.0,
        "sortino": float(r.mean() / downside * np.sqrt(periods_per_year)) if downside > 0 else 0.0,
        "max_drawdown": max_dd,
        "max_drawdown_bars": int((edges[1::2] - edges[::2]).max()) if len(edges) else 0,
        "calmar": float(cagr / abs(max_dd)) if max_dd < 0 else None,
        "bars": len(r),
        "periods_per_year": float(periods_per_year),
    }


def run_backtest(agent, choose_directive, market, split: str, env_cfg, seed: int, interval: int, device) -> dict:
    """Sequential sweep of `split` with one portfolio-mode env: the deterministic symbol agents trade every symbol
    from one account while choose_directive(obs, core, last_actions) -> (1,) sets the directive every `interval`
    bars. Returns the account's metrics (plus trades, win rate, exposure, turnover, costs, directive usage), the
    same for buy-and-hold of the benchmark and of an equal-weight basket (entry commission charged), and the curves.
    """
    start, stop = market.splits[split]
    core = VecTradingCore(market, 1, split=split, mode="portfolio", config=env_cfg, seed=seed, sequential=True)
    obs = core.reset(seed=seed)
    init = float(env_cfg.initial_capital)
    prev, last_actions, used = init, np.zeros((1, core.num_symbols), np.int64), np.zeros(NUM_DIRECTIVES)
    pnl, exposure, cost, trades, exits, wins, traded = [], [], 0.0, 0, 0, 0, 0.0
    while True:
        if len(pnl) % interval == 0:
            directive = np.asarray(choose_directive(obs, core, last_actions), dtype=np.int64)
            core.set_directives(directive)
            used[directive[0]] += 1
        with torch.no_grad():
            action = agent.get_action_and_value(to_torch(obs, device), deterministic=True)[0].cpu().numpy()
        in_profit = obs["position"][0, :, 2] > 0
        obs, _, terminated, truncated, info = core.step(action)
        executed, last_actions = info["executed_action"][0], info["policy_action"].copy()
        is_exit = (executed == 4) | (executed == 5)
        trades += int((executed != 0).sum())
        exits, wins = exits + int(is_exit.sum()), wins + int((is_exit & in_profit).sum())
        traded += float((np.abs(info["traded_shares"][0]) * info["fill_price"][0]).sum())
        equity = float(info["equity"][0, 0])
        pnl.append(equity - prev)  # a ruined account restarts with fresh capital: its loss stays in the book
        prev = init if terminated.any() else equity
        exposure.append(float(info["exposure"][0, 0]))
        cost += float(info["cost"][0].sum())
        if truncated.any():
            break
    n, ppy = len(pnl), market.data.bars_per_year
    curves = {"agent": init + np.r_[0.0, np.cumsum(pnl)]}
    keep = 1.0 - env_cfg.commission_bps / 1e4
    bench = market.data.benchmark[start : start + n + 1]
    curves["benchmark"] = init * keep * bench / bench[0]
    closes = market.valuation_close[start : start + n + 1]
    curves["equal_weight"] = init * keep * (closes / closes[0]).mean(1)
    report = {name: performance_metrics(curve, ppy) for name, curve in curves.items()}
    coords = np.unravel_index(np.arange(NUM_DIRECTIVES), DIRECTIVE_SHAPE)
    share = used / used.sum()
    report["agent"].update(
        trades=trades,
        win_rate=wins / exits if exits else None,
        exposure=float(np.mean(exposure)),
        turnover=traded / float(np.mean(curves["agent"])) * ppy / n,
        costs=cost,
        costs_frac=cost / init,
        directive_risk_level=float((share * coords[0]).sum()),
        directive_concentration_level=float((share * coords[1]).sum()),
        directive_regime_level=float((share * coords[2]).sum()),
        directive_most_used=int(used.argmax()),
    )
    report["curves"] = curves
    return report


def format_report(reports: dict[str, dict], split: str) -> str:
    """Markdown table: one row per metric, one column per strategy."""
    names = list(reports)
    keys = ["total_return", "cagr", "sharpe", "sortino", "max_drawdown", "max_drawdown_bars", "calmar"]
    keys += ["trades", "win_rate", "exposure", "turnover", "costs"]
    lines = [f"| {split} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        cells = [reports[n].get(k, "") for n in names]
        cells = [f"{c:.4g}" if isinstance(c, float) else ("-" if c in ("", None) else str(c)) for c in cells]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plumbing: observations to torch, logging to tensorboard and MLflow, checkpoints
# ---------------------------------------------------------------------------------------------------------------
def to_torch(obs: dict, device) -> dict:
    return {k: torch.as_tensor(v, device=device) for k, v in obs.items()}


def master_inputs(agent, obs: dict, directive_index, last_actions, state, device):
    """The master network's three inputs as tensors: symbol embeddings (E, S, D) from the symbol agents' shared
    encoder (no gradient: the master does not train the encoder), global features (E, 36), global state (E, .)."""
    with torch.no_grad():
        emb = agent.embed(to_torch(obs, device))
    glob = torch.as_tensor(global_features(obs, directive_index, last_actions), device=device)
    return emb, glob, torch.as_tensor(state, device=device)


def master_policy(agent, master, device):
    def choose(obs, core, last_actions):
        emb, glob, state = master_inputs(agent, obs, core.directive_index, last_actions, core.state(), device)
        with torch.no_grad():
            return master.get_action_and_value(emb, glob, state, deterministic=True)[0].cpu().numpy()

    return choose


def fixed_directive(index: int):
    return lambda obs, core, last_actions: np.full(core.num_envs, index)


def allreduce_grads(module: nn.Module, world_size: int) -> None:
    """Average the gradients of module over the torchrun processes with one flattened all-reduce."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    torch.nn.utils.vector_to_parameters(flat, grads)
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def log_scalars(writer, mlflow, metrics: dict, step: int) -> None:
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    if mlflow is not None:
        mlflow.log_metrics({MLFLOW_NAMES.get(t, t): float(v) for t, v in metrics.items()}, step=step)


def start_mlflow(args: Args, run_name: str):
    import mlflow

    mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
    mlflow.set_experiment(args.exp_name)
    mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v)[:250] for k, v in vars(args).items()})
    return mlflow


def dump_rank_state(envs, market, next_obs: dict) -> torch.Tensor:
    """What a rank needs to continue exactly, pickled into a uint8 tensor: the python/numpy/torch RNG, the next
    observation and the mutable state of its VecTradingCore (arrays except views and per-bar market tables, dicts of
    arrays, scalars, its RNG). `load_rank_state` writes the arrays back in place, so the core's internal views of its
    own buffers stay views (pickling the core object itself would silently break them)."""
    bars, state = len(market.data.timestamps), {}
    for k, v in vars(envs).items():
        if isinstance(v, np.ndarray) and v.base is None and not (v.ndim > 1 and v.shape[0] == bars):
            state[k] = v
        elif isinstance(v, dict) and v and all(isinstance(x, np.ndarray) for x in v.values()):
            state[k] = v
        elif isinstance(v, bool | int | float | np.random.Generator):
            state[k] = v
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    blob = pickle.dumps({"envs": state, "rng": rng, "next_obs": next_obs})
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def load_rank_state(envs, blob: torch.Tensor) -> dict:
    saved = pickle.loads(blob.numpy().tobytes())
    for k, v in saved["envs"].items():
        if isinstance(v, np.ndarray):
            np.copyto(getattr(envs, k), v)
        elif isinstance(v, dict):
            for name, array in v.items():
                np.copyto(getattr(envs, k)[name], array)
        else:
            setattr(envs, k, v)
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    return saved["next_obs"]


def write_summary(run_dir: Path, **fields) -> None:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(fields)
    path.write_text(json.dumps(summary, indent=2, default=float) + "\n")


if __name__ == "__main__":
    args = tyro.cli(Args)
    T, E, I = args.num_steps, args.num_envs, args.master_interval
    assert T > 0 and E > 0, f"--num-steps ({T}) and --num-envs ({E}) must be positive"
    assert 1 <= args.num_minibatches <= T * E and (T * E) % args.num_minibatches == 0, (
        f"--num-minibatches ({args.num_minibatches}) must divide num_steps * num_envs ({T * E}): minibatches split "
        "env-steps and keep every symbol; lower --num-minibatches or raise --num-steps / --num-envs"
    )
    assert I >= 1 and T % I == 0, (
        f"--num-steps ({T}) must be a multiple of --master-interval ({I}) so that every rollout holds whole master "
        "decisions; e.g. --num-steps 70 with --master-interval 7"
    )
    M = T // I
    if args.track and importlib.util.find_spec("mlflow") is None:
        raise SystemExit("--track logs to MLflow, which is not installed: `pip install mlflow` (or drop --track)")
    args.world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    use_cuda = args.cuda and torch.cuda.is_available()
    if args.world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")

    # market data: rank 0 fills the cache first so that ranks do not write it at once
    if rank == 0:
        market = prepare_market(args.data)
    if args.world_size > 1:
        dist.barrier()
    if rank != 0:
        market = prepare_market(args.data)
    S = args.num_symbols = len(market.data.symbols)
    args.batch_size = T * E * S
    args.master_batch_size = M * E
    args.num_iterations = args.total_timesteps // (args.batch_size * args.world_size)
    assert args.num_iterations >= 1, (
        f"--total-timesteps ({args.total_timesteps}) is below one rollout of num_steps * num_envs * num_symbols * "
        f"world_size = {args.batch_size * args.world_size} symbol-steps; raise it or shrink the rollout"
    )
    for name in (args.split, args.eval_split, args.test_split):
        assert name in market.splits, f"split {name!r} is not one of the data's splits {sorted(market.splits)}"
    env_cfg = args.env

    # encoder: a deliberate CPU default (the seed's transformer trains at ~94 samples/s on one of these cores)
    preset = args.encoder_preset if args.encoder_preset != "auto" else ("as_given" if use_cuda else "cpu")
    if preset == "cpu":  # fills the encoder fields left at their (transformer) defaults
        default = EncoderConfig()
        fill = {k: v for k, v in CPU_ENCODER.items() if getattr(args.encoder, k) == getattr(default, k)}
        args.encoder = replace(args.encoder, **fill)

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    # seeding (each rank its own seed and envs)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    envs = VecTradingCore(market, E, split=args.split, mode="portfolio", config=env_cfg, seed=args.seed + rank)
    if args.symbol_checkpoint:
        agent, args.encoder = load_symbol_agents(args.symbol_checkpoint, S)
        preset = f"from {args.symbol_checkpoint}"
    else:
        agent = SymbolPolicy(S, args.encoder, directive_dim=4)
    agent = agent.to(device).requires_grad_(not args.freeze_symbols)
    global_dim = global_features(envs.obs, envs.directive_index, np.zeros((E, S), np.int64)).shape[1]
    master = MasterNetwork(args.encoder.output_dim, global_dim, state_dim=envs.state_dim).to(device)
    value_norm = ValueNorm().to(device)
    model = nn.ModuleDict({"symbols": agent, "master": master, "value_norm": value_norm})  # one checkpoint
    if args.world_size > 1:  # identical initial weights on every rank
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    groups = [{"params": list(master.parameters()), "lr": args.master_learning_rate}]
    if not args.freeze_symbols:
        groups.append({"params": list(agent.parameters()), "lr": args.learning_rate})
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.Adam(groups, eps=1e-5)
    global_step, start_iteration = 0, 1
    next_obs_np = envs.reset(seed=args.seed + rank)
    capital = float(env_cfg.initial_capital)
    # master reward trackers per env: last equity, episode peak, last drawdown; the symbols' last policy actions
    track = {"equity": np.full(E, capital), "peak": np.full(E, capital), "dd": np.zeros(E)}
    last_actions = np.zeros((E, S), np.int64)

    if args.resume:
        ckpt = load_checkpoint(args.resume, model, optimizer, map_location=device)
        extra = ckpt["extra"]
        assert len(extra["ranks"]) == args.world_size, (
            f"{args.resume} was written by {len(extra['ranks'])} process(es); resume it with as many (got "
            f"{args.world_size})"
        )
        global_step, start_iteration = ckpt["global_step"], extra["iteration"] + 1
        own = extra["ranks"][rank]
        load_rank_state(envs, own["core"])  # the core's buffers are rewritten in place: next_obs_np is envs.obs
        track = {k: v.numpy() for k, v in own["track"].items()}
        last_actions = own["last_actions"].numpy()
        run_dir = Path(args.resume).resolve().parent
    else:
        run_dir = Path(args.run_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = run_dir.name

    writer, mlflow = None, None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_summary(run_dir, status="incomplete", run_name=run_name, global_step=global_step)
        writer = SummaryWriter(str(run_dir))
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
        )
        mlflow = start_mlflow(args, run_name) if args.track else None
        print(
            f"run {run_dir} | {S} symbols x {E} envs x {T} steps x {args.world_size} rank(s) = "
            f"{args.batch_size * args.world_size} symbol-steps and {M * E * args.world_size} master decisions per "
            f"iteration, {args.num_iterations} iterations | encoder preset {preset}: {args.encoder.kind} (d_model "
            f"{args.encoder.d_model}, output_dim {args.encoder.output_dim}) on {device} | symbol agents "
            f"{'frozen' if args.freeze_symbols else 'trained'}"
        )

    # ALGO Logic: Storage setup. Symbol level (T, E, S, ...) as in ppo_symbol_agent.py; master level (M, E, ...).
    obs = {
        k: torch.zeros((T, E, S) + tuple(shape), dtype=torch.int8 if k == "action_mask" else torch.float32)
        for k, shape in envs.observation_shapes.items()
    }
    obs = {k: v.to(device) for k, v in obs.items()}
    actions = torch.zeros((T, E, S), dtype=torch.long, device=device)
    logprobs, rewards, values, final_values = (torch.zeros((T, E, S), device=device) for _ in range(4))
    terminateds, truncateds = (torch.zeros((T, E, S), dtype=torch.bool, device=device) for _ in range(2))
    policy_actions, executed_actions = np.zeros((T, E, S), np.int8), np.zeros((T, E, S), np.int8)
    m_emb = torch.zeros((M, E, S, args.encoder.output_dim), device=device)
    m_glob = torch.zeros((M, E, global_dim), device=device)
    m_state = torch.zeros((M, E, envs.state_dim), device=device)
    m_actions = torch.zeros((M, E), dtype=torch.long, device=device)
    m_logprobs, m_raw_values, m_values, m_rewards, m_final_values = (
        torch.zeros((M, E), device=device) for _ in range(5)
    )
    m_terms, m_truncs = (torch.zeros((M, E), dtype=torch.bool, device=device) for _ in range(2))
    bench_close = market.data.benchmark
    start_time, start_step = time.time(), global_step
    last_eval = {}

    def master_value(o, rows):
        """Denormalised centralised value (len(rows),) of the observation dict o at env rows `rows`."""
        sub = {k: v[rows] for k, v in o.items()}
        state = state_from_obs(envs, o)[rows]
        emb, glob, st = master_inputs(agent, sub, envs.directive_index[rows], last_actions[rows], state, device)
        with torch.no_grad():
            v = master.get_value(emb, glob, st)
        return value_norm.denormalize(v) if args.value_norm else v

    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = frac * lr

        t_rollout = time.time()
        tele, comps, m_comps, episodes, dist_entropy = {}, {}, {}, {}, 0.0
        for step in range(T):
            global_step += E * S * args.world_size
            k = step // I
            if step % I == 0:  # ALGO LOGIC: the master decides; the directive rewrites this bar's masks at once
                emb, glob, state = master_inputs(
                    agent, next_obs_np, envs.directive_index, last_actions, envs.state(), device
                )
                with torch.no_grad():
                    directive, logprob, _, raw_value = master.get_action_and_value(emb, glob, state)
                m_emb[k], m_glob[k], m_state[k] = emb, glob, state
                m_actions[k], m_logprobs[k], m_raw_values[k] = directive, logprob, raw_value
                m_values[k] = value_norm.denormalize(raw_value) if args.value_norm else raw_value
                envs.set_directives(directive.cpu().numpy())
                acc = {key: np.zeros(E) for key in ("ret", "ret_sq", "bench", "dd_up", "div", "bars")}
                alive = np.ones(E, dtype=bool)
                m_terms[k], m_truncs[k], m_final_values[k] = False, False, 0.0
            for key, v in obs.items():
                v[step].copy_(torch.as_tensor(next_obs_np[key]))
            step_obs = {key: v[step] for key, v in obs.items()}
            with torch.no_grad():
                action, logprob, entropy, value = agent.get_action_and_value(step_obs)
            actions[step], logprobs[step], values[step] = action, logprob, value
            dist_entropy += entropy.mean().item() / T

            next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            rewards[step] = torch.as_tensor(reward, device=device)
            terminateds[step] = torch.as_tensor(terminated, device=device)
            truncateds[step] = torch.as_tensor(truncated, device=device)
            bootstrap = truncated & ~terminated  # (E, S): value of the ended episode's last observation
            final_values[step] = 0.0
            if bootstrap.any():
                rows = bootstrap.any(1)
                with torch.no_grad():
                    v_final = agent.get_value(to_torch({key: a[rows] for key, a in info["final_obs"].items()}, device))
                final_values[step][torch.as_tensor(rows, device=device)] = v_final
            last_actions = info["policy_action"].astype(np.int64)

            # ALGO LOGIC: master reward ingredients of this bar, counted until the episode ends
            done_env = (terminated | truncated).any(1)
            equity = info["equity"][:, 0].astype(np.float64)
            r = equity / track["equity"] - 1.0
            bar = np.asarray(info["bar"])
            track["peak"] = np.maximum(track["peak"], equity)
            dd = 1.0 - equity / track["peak"]
            size = np.where(done_env[:, None], info["final_obs"]["position"][..., 1], next_obs_np["position"][..., 1])
            for key, x in (
                ("ret", r),
                ("ret_sq", r * r),
                ("bench", bench_close[bar] / bench_close[bar - 1] - 1.0),
                ("dd_up", np.maximum(dd - track["dd"], 0.0)),
                ("div", herfindahl_complement(size.astype(np.float64))),
                ("bars", np.ones(E)),
            ):
                acc[key] += np.where(alive, x, 0.0)
            m_terms[k] |= torch.as_tensor(alive & terminated.any(1), device=device)
            ended_by_time = alive & truncated.any(1)
            if ended_by_time.any():
                m_final_values[k][torch.as_tensor(ended_by_time, device=device)] = master_value(
                    info["final_obs"], ended_by_time
                )
                m_truncs[k] |= torch.as_tensor(ended_by_time, device=device)
            alive &= ~done_env
            track["equity"] = np.where(done_env, capital, equity)
            track["peak"] = np.where(done_env, capital, track["peak"])
            track["dd"] = np.where(done_env, 0.0, dd)
            if step % I == I - 1:
                parts = master_reward(acc, args, S)
                m_rewards[k] = torch.as_tensor(sum(parts.values()), dtype=torch.float32, device=device)
                for key, v in parts.items():
                    m_comps[key] = m_comps.get(key, 0.0) + float(v.mean()) / M

            # telemetry: per-step means, summed over the rollout
            policy_actions[step], executed_actions[step] = info["policy_action"], info["executed_action"]
            for key in TELEMETRY_KEYS:
                tele[key] = tele.get(key, 0.0) + float(np.mean(info[key])) / T
            for key, v in info["reward_components"].items():
                comps[key] = comps.get(key, 0.0) + float(np.mean(v)) / T
            done_mask = info["episode"]["done_mask"]
            if done_mask.any():
                for key, v in info["episode"].items():
                    if key not in ("done_mask", "action_counts"):
                        episodes.setdefault(key, []).extend(np.asarray(v)[done_mask].tolist())
        rollout_seconds = time.time() - t_rollout

        # ALGO LOGIC: advantages with bootstrap at truncation, for both levels
        t_update = time.time()
        with torch.no_grad():
            next_value = agent.get_value(to_torch(next_obs_np, device))
            advantages, returns = compute_gae(
                rewards, values, terminateds, truncateds, final_values, next_value, args.gamma, args.gae_lambda
            )
            m_next_value = master_value(next_obs_np, np.ones(E, dtype=bool))
            m_advantages, m_returns = compute_gae(
                m_rewards, m_values, m_terms, m_truncs, m_final_values, m_next_value, args.master_gamma,
                args.master_gae_lambda,
            )  # fmt: skip
            if args.value_norm:  # PopArt-lite: the critic regresses normalised returns
                all_returns = [m_returns]
                if args.world_size > 1:  # every rank's normaliser sees every rank's returns, so they stay equal
                    all_returns = [torch.zeros_like(m_returns) for _ in range(args.world_size)]
                    dist.all_gather(all_returns, m_returns)
                value_norm.update(torch.cat(all_returns))
            m_targets = value_norm.normalize(m_returns) if args.value_norm else m_returns

        # ALGO LOGIC: symbol agents, PPO-clip over (T * E) env-steps that keep the symbol axis
        b_obs = {key: v.reshape((T * E,) + v.shape[2:]) for key, v in obs.items()}
        b_logprobs, b_actions = logprobs.reshape(T * E, S), actions.reshape(T * E, S)
        b_advantages, b_returns, b_values = (
            advantages.reshape(T * E, S),
            returns.reshape(T * E, S),
            values.reshape(T * E, S),
        )
        b_inds = np.arange(T * E)
        mb_rows = (T * E) // args.num_minibatches
        clipfracs, pg_loss, v_loss, entropy_loss, approx_kl, old_approx_kl = [], *(torch.zeros(()),) * 5
        for _epoch in range(0 if args.freeze_symbols else args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, T * E, mb_rows):
                mb_inds = torch.as_tensor(b_inds[start : start + mb_rows], device=device)
                mb_obs = {key: v[mb_inds] for key, v in b_obs.items()}
                logits, newvalue = agent(mb_obs)  # (mb, S, 7) logits masked by the rollout's mask, (mb, S)
                _, newlogprob, entropy = masked_policy(logits, b_actions[mb_inds])
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                if args.world_size > 1:
                    allreduce_grads(agent, args.world_size)
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None:
                kl_now = approx_kl.clone()
                if args.world_size > 1:
                    dist.all_reduce(kl_now)
                    kl_now /= args.world_size
                if kl_now > args.target_kl:
                    break

        # ALGO LOGIC: master, PPO-clip over (M * E) decisions; the centralised critic reads the global state
        mb_inds_all = np.arange(M * E)
        flat = lambda x: x.reshape((M * E,) + x.shape[2:])  # noqa: E731
        mb_emb, mb_glob, mb_state = flat(m_emb), flat(m_glob), flat(m_state)
        mb_act, mb_logp, mb_adv, mb_tgt, mb_old = map(
            flat, (m_actions, m_logprobs, m_advantages, m_targets, m_raw_values)
        )
        m_clipfracs = []
        for _epoch in range(args.update_epochs):
            np.random.shuffle(mb_inds_all)
            for idx in np.array_split(mb_inds_all, min(args.num_minibatches, M * E)):
                j = torch.as_tensor(idx, device=device)
                logits, newvalue = master(mb_emb[j], mb_glob[j], mb_state[j])
                _, newlogprob, entropy = masked_policy(logits, mb_act[j])
                logratio = newlogprob - mb_logp[j]
                ratio = logratio.exp()
                with torch.no_grad():
                    m_approx_kl = ((ratio - 1) - logratio).mean()
                    m_clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]
                adv = mb_adv[j]
                if args.norm_adv and len(j) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                m_pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef))
                m_pg_loss = m_pg_loss.mean()
                if args.clip_vloss:
                    v_clipped = mb_old[j] + torch.clamp(newvalue - mb_old[j], -args.clip_coef, args.clip_coef)
                    m_v_loss = 0.5 * torch.max((newvalue - mb_tgt[j]) ** 2, (v_clipped - mb_tgt[j]) ** 2).mean()
                else:
                    m_v_loss = 0.5 * ((newvalue - mb_tgt[j]) ** 2).mean()
                m_entropy = entropy.mean()
                loss = m_pg_loss - args.master_ent_coef * m_entropy + m_v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                if args.world_size > 1:
                    allreduce_grads(master, args.world_size)
                nn.utils.clip_grad_norm_(master.parameters(), args.max_grad_norm)
                optimizer.step()

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        m_pred, m_true = m_values.cpu().numpy(), m_returns.cpu().numpy()
        m_explained_var = np.nan if np.var(m_true) == 0 else 1 - np.var(m_true - m_pred) / np.var(m_true)
        update_seconds = time.time() - t_update

        # checkpoint: every rank's envs, next observation and RNG, gathered on rank 0
        if args.save_model and (iteration % max(args.eval_interval, 1) == 0 or iteration == args.num_iterations):
            own = {"core": dump_rank_state(envs, market, next_obs_np), "last_actions": torch.as_tensor(last_actions)}
            own["track"] = {key: torch.as_tensor(v) for key, v in track.items()}
            ranks = [None] * args.world_size
            if args.world_size > 1:
                dist.gather_object(own, ranks if rank == 0 else None, dst=0)
            else:
                ranks = [own]
            if rank == 0:
                extra = {"iteration": iteration, "ranks": ranks}
                save_checkpoint(
                    run_dir / "checkpoint.pt", model, optimizer, args=args, global_step=global_step, extra=extra
                )
        if rank != 0:
            continue
        policy_entropy = float(slot_action_entropy(policy_actions).mean())
        executed_entropy = float(slot_action_entropy(executed_actions).mean())
        policy_trades, executed_trades = (policy_actions != 0).mean(), (executed_actions != 0).mean()
        coords = np.stack(np.unravel_index(m_actions.cpu().numpy(), DIRECTIVE_SHAPE), -1).reshape(-1, 3)
        metrics = {
            "charts/learning_rate": optimizer.param_groups[-1]["lr"],
            "charts/master_learning_rate": optimizer.param_groups[0]["lr"],
            "charts/policy_entropy": dist_entropy,
            "charts/policy_action_entropy_mean": policy_entropy,
            "charts/executed_action_entropy_mean": executed_entropy,
            "charts/executed_vs_policy_trades": executed_trades / policy_trades if policy_trades > 0 else 1.0,
            "charts/sanitizer_trade_delta": 100.0 * (policy_trades - executed_trades),
            "charts/voluntary_trade_rate": tele["voluntary_trade"],
            "charts/consecutive_action_violations": tele["violations"],
            "charts/diversity_bonus": tele["diversity_bonus"],
            "charts/masked_attempt_rate": tele["masked_attempt"],
            "charts/forced_hold_rate": tele["forced_hold"],
            "charts/value_norm_mean": value_norm.mean.item(),
            "charts/value_norm_std": value_norm.var.sqrt().item(),
            "losses/value_loss": v_loss.item(),
            "losses/policy_loss": pg_loss.item(),
            "losses/entropy": entropy_loss.item(),
            "losses/old_approx_kl": old_approx_kl.item(),
            "losses/approx_kl": approx_kl.item(),
            "losses/clipfrac": float(np.mean(clipfracs)) if clipfracs else 0.0,
            "losses/explained_variance": float(explained_var),
            "losses/master_value_loss": m_v_loss.item(),
            "losses/master_policy_loss": m_pg_loss.item(),
            "losses/master_entropy": m_entropy.item(),
            "losses/master_approx_kl": m_approx_kl.item(),
            "losses/master_clipfrac": float(np.mean(m_clipfracs)),
            "losses/master_explained_variance": float(m_explained_var),
            "master/directive_risk_level": float(coords[:, 0].mean()),
            "master/directive_concentration_level": float(coords[:, 1].mean()),
            "master/directive_regime_level": float(coords[:, 2].mean()),
            "master/unique_directives": float(len(np.unique(m_actions.cpu().numpy()))),
            "master_reward/total": m_rewards.mean().item(),
            "trading/equity": tele["equity"],
            "trading/exposure": tele["exposure"],
            "trading/cost_per_step": tele["cost"],
            "trading/policy_trade_rate": float(policy_trades),
            "trading/executed_trade_rate": float(executed_trades),
            "reward/total": rewards.mean().item(),
            "perf/rollout_seconds": rollout_seconds,
            "perf/update_seconds": update_seconds,
        }
        for a, name in enumerate(ACTION_NAMES):
            metrics[f"charts/action_distribution/{name}"] = float((executed_actions == a).mean())
        metrics.update({f"reward/{key}": v for key, v in comps.items()})
        metrics.update({f"master_reward/{key}": v for key, v in m_comps.items()})
        if episodes:
            metrics["charts/episodic_return"] = float(np.mean(episodes["return"]))
            metrics["charts/episodic_length"] = float(np.mean(episodes["length"]))
            metrics["charts/ep_unique_actions"] = float(np.mean(episodes["unique_actions"]))
            metrics.update({f"trading/episode_{key}": float(np.mean(v)) for key, v in episodes.items()})
        if args.eval_interval and (iteration % args.eval_interval == 0 or iteration == args.num_iterations):
            t_eval = time.time()
            chooser = master_policy(agent, master, device)
            report = run_backtest(agent, chooser, market, args.eval_split, env_cfg, args.seed, I, device)
            last_eval = {key: v for key, v in report["agent"].items() if v is not None}
            metrics.update({f"trading/{args.eval_split}_{key}": v for key, v in last_eval.items()})
            metrics["perf/eval_seconds"] = time.time() - t_eval
        sps = int((global_step - start_step) / (time.time() - start_time))
        metrics["charts/SPS"] = sps
        log_scalars(writer, mlflow, metrics, global_step)
        print(
            f"iter {iteration}/{args.num_iterations} global_step={global_step} SPS={sps} "
            f"master_reward={metrics['master_reward/total']:.3f} risk_level={coords[:, 0].mean():.2f} "
            f"regime_level={coords[:, 2].mean():.2f} reward={metrics['reward/total']:.4f}"
            + (
                f" {args.eval_split}_max_drawdown={last_eval['max_drawdown']:.3f}"
                if "perf/eval_seconds" in metrics
                else ""
            )
        )
        last_telemetry = {
            MLFLOW_NAMES.get(key, key.split("/", 1)[1]): v for key, v in metrics.items() if key.startswith("charts/")
        }

    # final backtest on the test split: learned master vs fixed directives vs buy-and-hold
    if rank == 0:
        t_eval = time.time()
        choosers = {"master": master_policy(agent, master, device), "neutral": fixed_directive(NEUTRAL_DIRECTIVE)}
        choosers["defensive"] = fixed_directive(DEFENSIVE_DIRECTIVE)
        full = {
            n: run_backtest(agent, c, market, args.test_split, env_cfg, args.seed, I, device)
            for n, c in choosers.items()
        }
        reports = {name: report["agent"] for name, report in full.items()}
        reports.update(benchmark_bh=full["master"]["benchmark"], equal_weight_bh=full["master"]["equal_weight"])
        dd_master, dd_neutral = abs(reports["master"]["max_drawdown"]), abs(reports["neutral"]["max_drawdown"])
        reduction = 1.0 - dd_master / dd_neutral if dd_neutral > 0 else 0.0
        go = {
            "drawdown_reduction_vs_neutral": reduction,
            "criterion": "> 0.15 (seed 003 go criterion: the master cuts portfolio drawdown by more than 15%)",
            "passed": bool(reduction > 0.15),
            "return_change_vs_neutral": reports["master"]["total_return"] - reports["neutral"]["total_return"],
            "sharpe_change_vs_neutral": reports["master"]["sharpe"] - reports["neutral"]["sharpe"],
            # a master can cut drawdown by not trading at all: read the reduction together with the exposure, and
            # against the neutral book's bar returns scaled down to the master's exposure (plain de-leveraging)
            "exposure_master_vs_neutral": [reports["master"]["exposure"], reports["neutral"]["exposure"]],
        }
        lev = reports["master"]["exposure"] / max(reports["neutral"]["exposure"], 1e-12)
        bar_returns = np.diff(full["neutral"]["curves"]["agent"]) / full["neutral"]["curves"]["agent"][:-1]
        scaled = performance_metrics(np.r_[1.0, np.cumprod(1.0 + lev * bar_returns)], market.data.bars_per_year)
        go["neutral_deleveraged_max_drawdown"] = scaled["max_drawdown"]
        go["drawdown_reduction_vs_deleveraged_neutral"] = 1.0 - dd_master / max(abs(scaled["max_drawdown"]), 1e-12)
        curves = {name: report["curves"]["agent"] for name, report in full.items()}
        curves.update(benchmark=full["master"]["curves"]["benchmark"])
        for name, curve in curves.items():
            for i, value in enumerate(curve / curve[0]):
                writer.add_scalar(f"equity/{args.test_split}_{name}", value, i)
        table = format_report(reports, args.test_split)
        print(
            f"\nbacktest on the {args.test_split} split ({market.data.benchmark_name} benchmark, "
            f"{market.data.bars_per_year:g} bars a year):\n{table}\n"
            f"max drawdown: master {dd_master:.2%} vs neutral {dd_neutral:.2%} -> reduction {reduction:.1%} "
            f"({'passes' if go['passed'] else 'misses'} the > 15% go criterion); against neutral de-leveraged to the "
            f"master's exposure: {go['drawdown_reduction_vs_deleveraged_neutral']:.1%}"
        )
        (run_dir / "backtest.json").write_text(json.dumps(reports, indent=2, default=float) + "\n")
        (run_dir / "backtest.md").write_text(table + "\n")
        log_scalars(
            writer,
            mlflow,
            {f"trading/{args.test_split}_{k}": v for k, v in reports["master"].items() if isinstance(v, (int, float))},
            global_step,
        )
        writer.add_scalar("trading/drawdown_reduction_vs_neutral", reduction, global_step)
        writer.add_scalar("perf/eval_seconds", time.time() - t_eval, global_step)
        write_summary(
            run_dir,
            status="complete",
            global_step=global_step,
            encoder=args.encoder.kind,
            sps=sps,
            backtest=reports,
            go_criterion=go,
            val=last_eval,
            telemetry=last_telemetry,
            args=asdict(args),
        )
        writer.close()
        if mlflow is not None:
            mlflow.end_run()
    if args.world_size > 1:  # every rank must end with rank 0's weights (same init, same all-reduced gradients)
        weights = nn.utils.parameters_to_vector([*model.parameters(), *model.buffers()]).detach()
        reference = weights.clone()
        dist.broadcast(reference, src=0)
        assert torch.equal(weights, reference), f"rank {rank}: weights differ from rank 0's after training"
        dist.destroy_process_group()
