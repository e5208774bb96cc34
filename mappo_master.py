"""MAPPO for the master agent: a portfolio manager whose directives steer the symbol agents, trained on the core.

The S symbols of each env share one account (portfolio mode). Every ``master_interval`` bars (7 = one day) the
master picks one of the 60 directives (risk multiplier x concentration level x regime mode; table in
`VecTradingCore`) from three factored heads; the symbol agents act every bar under it (it enters their observation,
sizes and masks). Both levels use PPO-clip: the symbol agents as in ppo_symbol_agent.py (optionally from its
checkpoint, optionally frozen, then acting by argmax: the book the backtest tests), the master on pooled symbol
embeddings, portfolio features and the market's regime and cross-sectional state (`market_state`, read from the
market whether or not the symbol agents see it), with a centralised critic that also reads `VecTradingCore.state()`.
The master's reward (`master_reward`) is paired: its account's utility minus that of a shadow account that trades
the same symbol agents on the neutral directive over the same bars. The final test-split backtest
(`backtest.master_final_report`) compares the learned master with every baseline fitted on the train split (the
best constant directive, the volatility target, a correlation-threshold and a reactive rule) and, on markets with a
hidden edge state, the oracle that reads it (a ceiling), and reports the go criterion and the paired margins.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import tyro

import experiment as xp
from backtest import (
    backtest_figures,
    directive_figure,
    fit_fixed_directive,
    format_go_criterion,
    master_final_report,
    run_backtest,
)
from encoders import HEAD_OFFSETS, MASKED_LOGIT, EncoderConfig, MasterNetwork, SymbolPolicy, ValueNorm, set_input_shapes
from market_data import CROSS_SECTION_NAMES, DataConfig, cross_section_features
from trading_env import (
    ACTION_NAMES,
    DIRECTIVE_SHAPE,
    NEUTRAL_DIRECTIVE,
    PORTFOLIO_FEATURES,
    EnvConfig,
    VecTradingCore,
    add_step_telemetry,
    telemetry_metrics,
)


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
    """torch intra-op threads (0: torch's default); small batches gain little from more, and spinning threads slow
a busy machine (docs/training.md)"""
    track: bool = False
    """if toggled, the metrics are also sent to MLflow: the tracking URI in MLFLOW_TRACKING_URI, else a local ./mlruns
store (needs mlflow-skinny or mlflow)"""
    save_model: bool = False
    """if toggled, runs/<run>/checkpoint.pt is written at every evaluation and at the end (resumable)"""
    resume: str | None = None
    """path of a checkpoint.pt of this script to continue from (networks, optimiser, controllers, RNG, envs, global
step)"""
    resume_allow_mismatch: bool = False
    """if toggled, --resume continues its run even where this command's settings or data differ from the run's (each
difference is printed); without it such a resume is refused"""
    eval_checkpoint: str | None = None
    """path of a checkpoint.pt (or best.pt) of this script to evaluate: no training, the final backtest and report of
the saved agents on the test split of the data given by the --data.* flags (which must have the universe and
features they were trained on), in a new run folder"""
    run_dir: str = "runs"
    """folder that holds the run folders"""
    walk_forward: int = 0
    """K > 0: walk-forward evaluation over K folds: the last 1 - --data.train-frac of the bars cut into K test
blocks, each fold trained from scratch on its own earlier train split (--data.fold-window), its weights picked on
its own validation split, graded on its block; the fold runs and the stitched out-of-sample report go in one folder"""
    encoder_preset: Literal["auto", "cpu", "small_transformer", "small_lstm", "as_given"] = "auto"
    """auto: `small_transformer` on CUDA, `cpu` otherwise; cpu: the --encoder.* fields left at their defaults
become an MLP encoder (d_model 128, output_dim 128); small_transformer: they become the small transformer of the
benchmarks, d_model 64, 4 heads, 1 layer, feed-forward 128, output_dim 64 (benchmarks/BENCHMARKS.md); small_lstm:
a 1-layer LSTM of the same width, d_model 64, output_dim 64; as_given: the --encoder.* fields as they are, by
default the seed's transformer (d_model 256, 8 heads, 4 layers, output_dim 256), with no learning measurement"""
    symbol_checkpoint: str | None = None
    """checkpoint.pt of ppo_symbol_agent.py to initialise the symbol agents (its encoder settings are used)"""
    freeze_symbols: bool = False
    """if toggled, the symbol agents are not updated: only the master learns (the symbol level's rollout buffers, GAE
and update are skipped)"""
    frozen_sampling: bool = False
    """if toggled, frozen symbol agents sample their actions in the master's rollouts; default: argmax, the book that
the backtest tests (a sampled book trades differently and earns less)"""

    # --- environment ---
    data: DataConfig = field(default_factory=DataConfig)
    """market data: synthetic market or the user's files, features, splits"""
    env: EnvConfig = field(default_factory=lambda: EnvConfig(episode_length=280))
    """trading environment: capital, costs, slippage, limits, reward weights (episodes of 280 bars = 40 trading days,
a whole number of master decisions)"""
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(dropout=0.0))
    """encoder sizes (see --encoder-preset; dropout 0 keeps PPO's importance ratio exact)"""
    split: Literal["train", "val", "test"] = "train"
    """split the agents train on (random episode starts inside it); the master's baselines, best constant and
calibrated risk aversion are fitted on it too. With frozen symbol agents, val trains the master on bars they never
learned from (on their own train split their book is in-sample: docs/training.md)"""
    eval_split: Literal["train", "val", "test"] = "val"
    """split of the periodic deterministic evaluation (a sequential sweep)"""
    eval_interval: int = 10
    """evaluate (and checkpoint with --save-model) every this many iterations; 0 disables periodic evaluation"""
    test_split: Literal["train", "val", "test"] = "test"
    """split of the final backtest"""
    master_interval: int = 7
    """bars between two master decisions (7 hourly bars = one trading day)"""
    stress: bool = True
    """stress tests in the final report: costs x2 and x3, impact x5, one bar of latency, the worst crash replayed,
and without each of the 5 largest contributors"""

    # --- algorithm (symbol agents, CleanRL's names) ---
    total_timesteps: int = 14_336_000
    """total symbol-steps of the experiment (all ranks together); the default is 80 iterations at 10 symbols, 204,800
master decisions"""
    learning_rate: float = 3e-4
    """the learning rate of the symbol agents' optimizer"""
    num_envs: int = 256
    """the number of parallel environments per rank (each one account trading all symbols); 256 envs x 70 bars
give 2,560 master decisions per update"""
    num_steps: int = 70
    """the number of bars per environment per rollout (a multiple of master_interval)"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for both levels"""
    gamma: float = 0.99
    """the discount factor gamma of the symbol agents (per bar)"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation of the symbol agents"""
    num_minibatches: int = 4
    """the number of mini-batches of both levels (split over env-steps, each keeping all S symbols, and over master
decisions: 640 a minibatch by default)"""
    update_epochs: int = 4
    """the K epochs to update the policies"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.03
    """entropy coefficient of the symbol agents (constant; the full entropy stack is ppo_symbol_agent.py's)"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold (stops the epochs of an update early)"""

    # --- algorithm (master) ---
    master_learning_rate: float = 3e-4
    """the learning rate of the master network"""
    master_gamma: float = 0.8
    """discount per master decision (per trading day): a directive's effect on the book fades within about a day"""
    master_gae_lambda: float = 0.8
    """GAE lambda over master decisions"""
    master_update_epochs: int | None = None
    """epochs of the master's PPO update per rollout (None: --update-epochs); its update is tiny beside the rollout,
so more passes over the same decisions cost almost no time"""
    master_num_minibatches: int | None = None
    """minibatches of the master's PPO update (None: --num-minibatches)"""
    master_ent_coef: float = 0.01
    """initial entropy coefficient of each directive head (risk, concentration, mode), adapted toward the
target --master-ent-target"""
    master_ent_target: float = 0.2
    """target of each head's entropy, normalised by log(head size) (1 = uniform): a head below it gets a larger
coefficient, one above it a smaller one (log-coefficient step: --master-ent-lr x the shortfall per iteration)"""
    master_ent_lr: float = 1.0
    """step of the log entropy coefficients per iteration; 0 keeps --master-ent-coef fixed"""
    value_norm: bool = True
    """normalise the centralised critic's targets by a running mean / std of the returns (PopArt-lite)"""
    master_reward: Literal["paired", "seed"] = "paired"
    """paired: the master account's utility minus that of a shadow account on the neutral directive over the same
bars (the market and the book's noise cancel), and a thresholded drawdown penalty, also paired; seed: the seed's four
components (risk-adjusted return, diversification, drawdown, excess over the benchmark); see master_reward"""
    master_anchor: Literal["auto", "neutral", "best_constant"] = "auto"
    """the directive the shadow account trades and the master starts from: neutral, or the best constant directive
fitted on the split the master trains on (backtest.fit_fixed_directive on the frozen symbol agents), from which the
master then learns when to depart; auto: best_constant with frozen agents from a symbol checkpoint, else neutral"""
    master_heads: Literal["auto", "all", "risk"] = "auto"
    """all: the master picks every directive coordinate (risk, concentration level, regime mode); risk: it picks the
risk multiplier only (flat 0 up to 1.25), the concentration level and the regime mode pinned to the anchor's (the
master-anchor flag's directive), so that its one choice is how much of the anchor's book to hold, when; auto: risk
when anchored on the best constant, else all (on held-out bars the risk head alone beat all heads with a neutral
anchor by about half a Sharpe ratio over 5 seeds: benchmarks/BENCHMARKS.md)"""
    master_inputs: Literal["auto", "full", "market", "market_state", "cross"] = "auto"
    """what the master's actor reads. full: the symbol agents' embeddings pooled over symbols (mean and max), the
account's portfolio features, the market state, the book's last-interval return, the current directive and the symbol
agents' intents; market: the market state (regime block and cross-sectional state), the book's last-interval return
and the current directive only (26 inputs), a far smaller function class for the ~1,000 days a master trains on;
market_state: the same without the book's return (25 inputs: what the market alone tells it); cross: the
cross-sectional state only (average pairwise correlation, dispersion, last-day lag-1 autocorrelation), the book's
return and the directive (16 inputs: no regime block); auto: market when
anchored on the best constant, else full (on held-out bars the market inputs beat the full ones over 5 seeds:
benchmarks/BENCHMARKS.md). The centralised critic reads the global state either way"""
    master_advantage: Literal["gae", "counterfactual"] = "gae"
    """how the master's actor learns. gae: PPO-clip on the drawn directive's GAE advantage; counterfactual: at every
n-th decision point (--master-cf-every) both sides of the two-way risk switch are played out from the account's
state on the same bars with the same frozen argmax agents (two twin cores): that side for one interval, then the
anchor for the rest of --master-cf-horizon, so that what a day's choice leaves in the book is credited to it. R(s, a)
is that stream's paired reward discounted by --master-gamma, and the actor maximises sum_a pi(a|s) R(s, a) over both
sides, an all-action policy gradient without the noise of which side was drawn (counterfactual_rewards). Needs
frozen argmax agents, --master-heads risk, --master-risk-levels flat_or_anchor (their auto values with
a --symbol-checkpoint) and the paired reward"""
    master_cf_horizon: int = 3
    """--master-advantage counterfactual: the intervals (days) each side is played out for"""
    master_cf_every: int = 2
    """--master-advantage counterfactual: play both sides out at every n-th decision point of a rollout (the
look-ahead costs 2 x horizon / n intervals of stepping per interval the rollout steps)"""
    master_actor_hidden: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the master's actor (the critic keeps 256, 256); with no value (--master-actor-hidden
alone) the actor is linear in its inputs: one logit per directive coordinate, a weighted sum of the features"""
    master_risk_levels: Literal["auto", "all", "flat_or_anchor"] = "auto"
    """the risk levels the master may pick: all five (flat 0 up to 1.25), or flat_or_anchor: flat (0, no new buys) or
the anchor's level, a two-way switch like the rules' (a master that is nearly indifferent between two close levels
otherwise flips between them on noise); auto: flat_or_anchor when the master picks the risk level alone on the best
constant's book, else all (with it the master reads the announced reversal on every held-out seed: see
benchmarks/BENCHMARKS.md)"""
    master_norm: Literal["auto", "on", "off"] = "auto"
    """on: standardise what the master's actor reads, each market-state column by its mean and standard deviation over
the bars of --split and the book's last-interval return by that book's typical interval return (the best constant's
on --split, with frozen agents), saved with the master's weights; auto: on with --master-inputs market or
market_state, off with full inputs (unmeasured there)"""
    anchor_bias: float = 2.0
    """--master-anchor best_constant: initial logit bias of each directive head toward the anchor's coordinate"""
    risk_aversion: float | None = None
    """paired reward: lambda of the per-bar utility r - lambda / 2 r^2 (concave: the best scale of a book with bar
mean mu and mean square m2 is mu / (lambda m2), interior and moving with the state). None (default): calibrated on
the bars the master trains on (--split) to the best constant directive's book, lambda = mu / m2 of the frozen symbol
agents under it, so that the best scale of that book is itself and a riskier directive pays only if it raises the
Sharpe ratio; this needs frozen agents from a symbol checkpoint (agents still training have no fixed book), else
FALLBACK_RISK_AVERSION (50)"""
    dd_coef: float = 2.0
    """master reward: weight of the drawdown penalty (each increase of the drawdown beyond --dd-threshold)"""
    dd_threshold: float = 0.05
    """master reward: drawdown from the episode peak below which nothing is charged (0: the seed's penalty)"""
    risk_coef: float = 0.5
    """seed reward: weight of the realised volatility subtracted from the return"""
    div_coef: float = 0.05
    """seed reward: weight of the diversification term"""
    excess_coef: float = 0.5
    """seed reward: weight of the return in excess of the benchmark"""

    # --- filled in at runtime (not flags) ---
    num_symbols: int = field(default=0, init=False)
    """symbols per environment (from the data)"""
    batch_size: int = field(default=0, init=False)
    """symbol-steps per rollout per rank (num_steps * num_envs * num_symbols)"""
    master_batch_size: int = field(default=0, init=False)
    """master decisions per rollout per rank (num_steps / master_interval * num_envs)"""
    num_iterations: int = field(default=0, init=False)
    """the number of iterations (computed in runtime)"""
    world_size: int = field(default=1, init=False)
    """torchrun processes"""


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: masked sampling, GAE and the PPO-clip loss (the same lines stand in ppo_symbol_agent.py, as CleanRL does)
# ---------------------------------------------------------------------------------------------------------------
def to_torch(obs: dict, device) -> dict:
    return {k: torch.as_tensor(v, device=device) for k, v in obs.items()}


def masked_policy(
    logits: torch.Tensor, action: torch.Tensor | None = None, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From masked logits (..., A) (disallowed actions at MASKED_LOGIT): action (...) long (sampled, argmax if
    deterministic, or the given one), its log-probability, the entropy normalised by log(number of allowed actions)
    (1 = uniform over what is allowed, 0 where a single action is allowed), and where there is a choice (bool).
    Masked actions have probability exactly 0, so they contribute 0 to the entropy and are never sampled."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., A)
    p = logp.exp()
    if action is None:
        if deterministic:
            action = logits.argmax(dim=-1)
        else:
            action = torch.multinomial(p.reshape(-1, p.shape[-1]), 1).reshape(p.shape[:-1])
    action = action.long()
    # where() rather than p * logp: 0 * (-1e8) is 0 anyway, but this keeps the gradient of masked entries at 0.
    nats = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)
    allowed = (logits > MASKED_LOGIT / 2).sum(-1)  # at most 4 of the 7 trading actions: nats are not comparable
    choice = allowed > 1
    entropy = torch.where(choice, nats / torch.log(allowed.clamp(min=2).float()), torch.zeros_like(nats))
    return action, logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), entropy, choice


def choice_mean(x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Mean of x over the states with a choice (more than one allowed action)."""
    return (x * choice).sum() / choice.sum().clamp(min=1)


def argmax_policy(agent: nn.Module, device):
    """The symbol agents' deterministic (argmax) policy as a function of a numpy observation dict, for run_backtest."""

    return lambda obs: symbol_actions(agent, obs, device, deterministic=True)


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


def ppo_loss(newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, clip_coef, clip_vloss, norm_adv):
    """PPO-clip policy loss and (clipped) value loss of one minibatch (Schulman et al. 2017, as CleanRL's ppo.py).
    Returns pg_loss, v_loss, old_approx_kl, approx_kl and the clipped fraction (a float)."""
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    with torch.no_grad():
        # calculate approx_kl http://joschu.net/blog/kl-approx.html
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean().item()
    if norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # Policy loss
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    # Value loss
    if clip_vloss:
        v_loss_unclipped = (newvalue - returns) ** 2
        v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -clip_coef, clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    return pg_loss, v_loss, old_approx_kl, approx_kl, clipfrac


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the master's reward and inputs (unit-tested in tests/test_mappo_master.py)
# ---------------------------------------------------------------------------------------------------------------
HEAD_NAMES = ("risk", "concentration", "mode")  # the factored directive heads, in DIRECTIVE_SHAPE order
INGREDIENTS = ("ret", "ret_sq", "shadow_ret", "shadow_ret_sq", "dd_up", "shadow_dd_up", "bench", "div", "bars")
MASTER_REWARD_COMPONENTS = {
    "paired": ("paired_utility", "paired_drawdown"),
    "seed": ("risk_adjusted", "diversification", "drawdown", "excess"),
}


def bar_ingredients(info: dict, shadow_info: dict, last_dd: np.ndarray, last_shadow_dd: np.ndarray, bench_close,
                    dd_threshold: float) -> dict:  # fmt: skip
    """One bar's master reward ingredients (INGREDIENTS, each (E,)) from the master account's step info and the shadow
    account's, with the drawdowns of the previous bar (the thresholded drawdown's increases are charged)."""
    r, dd, bar = info["account_return"][:, 0], info["drawdown"][:, 0], info["bar"]  # before any restart
    r_sh, dd_sh = shadow_info["account_return"][:, 0], shadow_info["drawdown"][:, 0]
    beyond = lambda x: np.maximum(x - dd_threshold, 0.0)  # noqa: E731  (the thresholded drawdown)
    return {
        "ret": r, "ret_sq": r * r, "shadow_ret": r_sh, "shadow_ret_sq": r_sh * r_sh,
        "dd_up": np.maximum(beyond(dd) - beyond(last_dd), 0.0),
        "shadow_dd_up": np.maximum(beyond(dd_sh) - beyond(last_shadow_dd), 0.0),
        "bench": bench_close[bar] / bench_close[bar - 1] - 1.0, "div": herfindahl_complement(info["holdings"]),
        "bars": np.ones(len(r)),
    }  # fmt: skip


def other_side(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The other allowed directive (E,) of a two-way switch, from the master's masked joint logits (E, 60) and the
    chosen directives (E,); the chosen one itself where it is the only one allowed (an anchor that is already flat)."""
    allowed = logits > MASKED_LOGIT / 2
    if (allowed.sum(-1) > 2).any():
        raise ValueError("--master-advantage counterfactual needs at most two allowed directives per decision.")
    rows = torch.arange(len(chosen), device=logits.device)
    allowed[rows, chosen] = False
    return torch.where(allowed.any(-1), allowed.float().argmax(-1), chosen)


def all_action_loss(logits: torch.Tensor, chosen, reward_chosen, alt, reward_alt, scale: float) -> torch.Tensor:
    """-sum_a pi(a|s) R(s, a) / scale, averaged over decisions: the all-action policy loss of a two-way switch whose
    rewards under both sides are known (each played out on a twin: counterfactual_rewards). A per-decision
    baseline would not change its gradient (the probabilities sum to 1), so none is subtracted."""
    p = torch.softmax(logits.float(), dim=-1)
    rows = torch.arange(len(chosen), device=logits.device)
    return -(p[rows, chosen] * reward_chosen + p[rows, alt] * reward_alt).mean() / scale


def counterfactual_rewards(envs, twins, sides, anchor: int, agent, device, args, last_dd: np.ndarray, bench_close):
    """R(s, a) (len(sides), E) of each side of the switch, played out from the account's state: for each first
    directive in sides (each (E,)), a twin core set to envs' state steps args.master_interval bars on it, then
    args.master_cf_horizon - 1 more intervals on the anchor, with the frozen agents acting by argmax on the twin's own
    observations. Each interval's paired reward (master_reward; the shadow's terms are left out, since they are the
    same on every side) is discounted by args.master_gamma per interval; an account whose episode ends stops earning.
    Reads the bars ahead of the decision as any rollout's reward does; the master's inputs never see them."""
    E, start = envs.num_envs, envs.get_state()
    zeros = {"account_return": np.zeros((E, 1)), "drawdown": np.zeros((E, 1))}
    out = np.zeros((len(sides), E))
    for i, (twin, first) in enumerate(zip(twins, sides, strict=True)):
        twin.set_state(start)
        alive, dd = np.ones(E, dtype=bool), last_dd
        for h in range(args.master_cf_horizon):
            twin.set_directives(first if h == 0 else np.full(E, anchor))
            sums = {key: np.zeros(E) for key in INGREDIENTS}
            for _ in range(args.master_interval):
                _, _, terminated, truncated, info = twin.step(symbol_actions(agent, twin.obs, device, True))
                bar = bar_ingredients(info, zeros, dd, np.zeros(E), bench_close, args.dd_threshold)
                for key, x in bar.items():
                    sums[key] += np.where(alive, x, 0.0)
                alive &= ~(terminated | truncated).any(1)
                dd = info["drawdown"][:, 0]
            out[i] += args.master_gamma**h * sum(master_reward(sums, args, twin.num_symbols).values())
    return out


def master_reward(sums: dict, args, num_symbols: int) -> dict:
    """Components (E,) of the master's reward from `sums`, one decision's ingredients (E,) each summed over the bars
    to the next decision (or the episode's end): ret, ret_sq (the account's bar returns r and r^2), shadow_ret,
    shadow_ret_sq (the same for the shadow account: the same symbol agents on the neutral directive over the same
    bars), dd_up and shadow_dd_up (increases of max(0, dd - dd_threshold), dd the drawdown from the episode peak),
    bench (benchmark bar returns b), div (1 - Herfindahl of the position weights w, 0 when flat), bars (bars
    counted); args: this script's Args. Percent units (x 100).

    paired (default; lambda = risk_aversion):
        paired_utility  = 100 * sum [(r - lambda/2 r^2) - (r_shadow - lambda/2 r_shadow^2)]
        paired_drawdown = -dd_coef * 100 * (sum dd_up - sum shadow_dd_up)
    The difference cancels what the master cannot change (the market's and the book's moves are in both accounts),
    and the concave utility makes the best leverage interior: a book whose edge is the same in every state has one
    best directive, a book whose edge flips sign has a different one in each state (tests/test_mappo_master.py).
    seed (the seed's four components; --dd-threshold 0 for its drawdown term):
        risk_adjusted   = 100 * (sum r - risk_coef * sqrt(sum r^2))        return minus realised volatility
        diversification = div_coef * mean over bars of (1 - sum w^2) / (1 - 1/S)
        drawdown        = -dd_coef * 100 * sum dd_up                         every new loss beyond the threshold
        excess          = excess_coef * 100 * (sum r - sum b)                return over the benchmark
    The seed's terms are linear in leverage, so their optimum is a constant corner whatever the state (DESIGN.md §2).
    """
    if args.master_reward == "paired":
        lam = args.risk_aversion
        utility = (sums["ret"] - 0.5 * lam * sums["ret_sq"]) - (sums["shadow_ret"] - 0.5 * lam * sums["shadow_ret_sq"])
        return {
            "paired_utility": 100.0 * utility,
            "paired_drawdown": -args.dd_coef * 100.0 * (sums["dd_up"] - sums["shadow_dd_up"]),
        }
    div_max = 1.0 - 1.0 / num_symbols if num_symbols > 1 else 1.0
    return {
        "risk_adjusted": 100.0 * (sums["ret"] - args.risk_coef * np.sqrt(sums["ret_sq"])),
        "diversification": args.div_coef * sums["div"] / np.maximum(sums["bars"], 1) / div_max,
        "drawdown": -args.dd_coef * 100.0 * sums["dd_up"],
        "excess": args.excess_coef * 100.0 * (sums["ret"] - sums["bench"]),
    }


FALLBACK_RISK_AVERSION = 50.0  # --risk-aversion when it cannot be calibrated (symbol agents that still train)


def calibrated_risk_aversion(fixed: dict) -> float:
    """lambda = mu / m2 of the best constant directive's book on train (fixed: backtest.fit_fixed_directive's result,
    bar_mean and bar_mean_sq per directive): the utility mean(k r - lambda/2 (k r)^2) of that book scaled by k is
    best at k = 1. For any book the best-scaled utility is mu^2 / (2 lambda m2), increasing in its Sharpe ratio, so
    the calibrated utility ranks directives near the best constant's scale as their Sharpe ratios do."""
    mu, m2 = fixed["bar_mean"][fixed["best"]], fixed["bar_mean_sq"][fixed["best"]]
    if not (mu > 0 and m2 > 0):  # no positive edge under any constant: nothing to scale to
        return FALLBACK_RISK_AVERSION
    return float(mu / m2)


def herfindahl_complement(holdings: np.ndarray) -> np.ndarray:
    """Holdings (E, S), in dollars or as weights (any nonnegative amounts; they are normalised per env) -> 1 - the
    Herfindahl index of the position weights (E,): 0 when flat or in one position, 1 - 1/n for n equal positions."""
    total = holdings.sum(1)
    share = np.divide(holdings, total[:, None], out=np.zeros_like(holdings), where=total[:, None] > 0)
    return np.where(total > 0, 1.0 - (share * share).sum(1), 0.0)


def market_state(market) -> np.ndarray:
    """(T, 13) float32: what the master reads of the market at each bar, whether or not the symbol agents see it:
    the regime block (10, market_data.REGIME_NAMES) and the cross-sectional state (3, CROSS_SECTION_NAMES: average
    pairwise correlation over two days, dispersion and the pooled lag-1 autocorrelation over the last day), all
    causal (a value at bar t uses bars <= t)."""
    return np.concatenate([market.regime, cross_section_features(market.data)], axis=1).astype(np.float32)


def global_features(
    obs: dict, directive_index, last_actions, state_now: np.ndarray, recent: np.ndarray, inputs: str = "full"
) -> np.ndarray:
    """The master actor's portfolio-level input (E, 41): the account's portfolio features (8), the market state at
    the observation bar (13, market_state), the book's return over the last decision interval (1, recent), the
    current directive as one-hot grid coordinates (5 + 4 + 3), and the share of symbols whose last policy action was
    each of the 7 actions (the symbol agents' intents). inputs="market" (--master-inputs market): the market state,
    the recent return and the directive only (E, 26); "market_state": the market state and the directive (E, 25);
    "cross": the cross-sectional state (the last 3 market-state columns), the recent return, the directive (E, 16)."""
    E = len(directive_index)
    parts = [obs["portfolio"][:, 0]] if inputs == "full" else []
    parts += [state_now[:, state_columns(inputs, state_now.shape[1])]]
    parts += [np.asarray(recent, np.float32).reshape(E, 1)] if inputs != "market_state" else []
    for coord, n in zip(np.unravel_index(directive_index, DIRECTIVE_SHAPE), DIRECTIVE_SHAPE, strict=True):
        one_hot = np.zeros((E, n), np.float32)
        one_hot[np.arange(E), coord] = 1.0
        parts.append(one_hot)
    if inputs == "full":
        parts.append((last_actions[..., None] == np.arange(len(ACTION_NAMES))).mean(1))
    return np.concatenate(parts, axis=1).astype(np.float32)


def state_columns(inputs: str, n_state: int) -> slice:
    """The market-state columns the master's actor reads: all of them, or with --master-inputs cross the
    cross-sectional state only (the last len(CROSS_SECTION_NAMES) columns of market_state)."""
    return slice(n_state - len(CROSS_SECTION_NAMES), n_state) if inputs == "cross" else slice(0, n_state)


def input_norm(states: np.ndarray, rows: tuple[int, int], inputs: str, global_dim: int, recent_sd: float = 1.0):
    """--master-norm's (shift, scale) of the actor's global features (global_dim each; global_features' layout):
    the market-state columns by their mean and standard deviation over the bars rows[0]:rows[1] (--split), the book's
    last-interval return column by recent_sd; the portfolio features, one-hot directive and intents unchanged."""
    shift, scale = np.zeros(global_dim, np.float32), np.ones(global_dim, np.float32)
    first = len(PORTFOLIO_FEATURES) if inputs == "full" else 0
    block = states[rows[0] : rows[1], state_columns(inputs, states.shape[1])].astype(np.float64)
    sd = block.std(0)
    n = block.shape[1]
    shift[first : first + n] = block.mean(0)
    scale[first : first + n] = np.where(sd > 1e-8, sd, 1.0)  # a constant column stays as it is
    if inputs != "market_state":
        scale[first + n] = recent_sd if recent_sd > 0 else 1.0  # 0: a book that never trades
    return shift, scale


def master_inputs(agent, obs: dict, glob: np.ndarray, state, device, embed: bool = True):
    """The master network's three inputs as tensors: symbol embeddings (E, S, D) from the symbol agents' shared
    encoder (no gradient: the master does not train the encoder; embed=False, --master-inputs market: (E, S, 0)),
    global features (E, G), global state (E, .)."""
    with torch.no_grad():
        if embed:
            emb = agent.embed(to_torch(obs, device))
        else:
            emb = torch.zeros(tuple(obs["portfolio"].shape[:2]) + (0,), device=device)  # (E, S, 0)
    return emb, torch.as_tensor(glob, device=device), torch.as_tensor(state, device=device)


def master_policy(agent, master, device, states: np.ndarray, interval: int, inputs: str = "full"):
    """The learned master as a directive chooser for run_backtest (argmax of its directive distribution); inputs:
    --master-inputs."""

    def choose(obs, core, last_actions):
        recent = core.recent_return(interval)[:, 0]
        glob = global_features(obs, core.directive_index, last_actions, states[core.t], recent, inputs)
        emb, glob, state = master_inputs(agent, obs, glob, core.state(), device, embed=master.embed_dim > 0)
        with torch.no_grad():
            return masked_policy(master(emb, glob, state)[0], deterministic=True)[0].cpu().numpy()

    return choose


def symbol_actions(agent, obs: dict, device, deterministic: bool) -> np.ndarray:
    """Actions (E, S) of frozen symbol agents: argmax (the tested book) or sampled."""
    with torch.no_grad():
        return masked_policy(agent.get_logits(to_torch(obs, device)), deterministic=deterministic)[0].cpu().numpy()


if __name__ == "__main__":
    xp.report_user_errors()  # bad input: one message naming the input and the fix, exit status 2, no traceback
    defaults = xp.resume_defaults(Args, sys.argv[1:])  # --resume: the run's own settings, unless a flag says otherwise
    args = tyro.cli(Args) if defaults is None else tyro.cli(Args, default=defaults)
    T, E, I = args.num_steps, args.num_envs, args.master_interval
    xp.check_run_args(args)  # the flags both scripts share, and the --data.* flags
    frozen_agents = bool(args.freeze_symbols and args.symbol_checkpoint)
    if args.master_anchor == "auto":  # resolved once and saved with the run's settings
        args.master_anchor = "best_constant" if frozen_agents else "neutral"
    if args.master_heads == "auto":
        args.master_heads = "risk" if args.master_anchor == "best_constant" else "all"
    if args.master_inputs == "auto":
        args.master_inputs = "market" if args.master_anchor == "best_constant" else "full"
    if args.master_norm == "auto":
        args.master_norm = "off" if args.master_inputs == "full" else "on"
    if args.master_risk_levels == "auto":
        risk_on_best = args.master_heads == "risk" and args.master_anchor == "best_constant"
        args.master_risk_levels = "flat_or_anchor" if risk_on_best else "all"
    xp.require(args.master_anchor == "neutral" or frozen_agents, "--master-anchor "
               "best_constant fits the best fixed directive on the frozen symbol agents: add --freeze-symbols and "
               "--symbol-checkpoint")  # fmt: skip
    xp.require(not (args.walk_forward and args.symbol_checkpoint), "--walk-forward trains every fold's agents "
            "from scratch on its own train split; a --symbol-checkpoint's agents saw other bars: drop it")  # fmt: skip
    if args.walk_forward:  # K folds, each this script in a process of its own, then the stitched out-of-sample report
        xp.run_walk_forward(__file__, args, "master")
        raise SystemExit(0)
    for flag in ("master_update_epochs", "master_num_minibatches"):
        value = getattr(args, flag)
        xp.require(value is None or value >= 1, f"--{flag.replace('_', '-')} {value}: give 1 or more (or leave it "
                   "out to use the symbol agents' setting)")  # fmt: skip
    counterfactual = args.master_advantage == "counterfactual"
    switch = args.master_heads == "risk" and args.master_risk_levels == "flat_or_anchor"
    xp.require(not counterfactual or (frozen_agents and not args.frozen_sampling and switch
               and args.master_reward == "paired"), "--master-advantage counterfactual plays both sides of the "
               "two-way risk switch out with the same argmax agents: it needs --freeze-symbols --symbol-checkpoint, no "
               "--frozen-sampling, --master-heads risk, --master-risk-levels flat_or_anchor and --master-reward "
               "paired (or leave it at gae)")  # fmt: skip
    for flag in ("master_cf_horizon", "master_cf_every"):
        xp.require(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} {getattr(args, flag)}: give 1 or more")
    xp.require(I >= 1 and T % I == 0, f"--num-steps ({T}) must be a multiple of --master-interval ({I}) so that every "
            "rollout holds whole master decisions; e.g. --num-steps 70 with --master-interval 7")  # fmt: skip
    xp.require(I <= args.env.risk_window, f"--master-interval ({I}) must be at most --env.risk-window "
               f"({args.env.risk_window}): the master reads the book's last interval of returns from it")  # fmt: skip
    M = T // I
    args.world_size, rank, device = xp.init_distributed(args.cuda)

    market = xp.prepare_market_on_ranks(args.data, rank, args.world_size)
    S = args.num_symbols = len(market.data.symbols)
    args.batch_size = T * E * S
    args.master_batch_size = M * E
    xp.rollout_iterations(args, rank)  # whole rollouts; a total that is not is announced
    env_cfg = args.env

    # encoder: an MLP by default on CPU (--encoder-preset; the transformer is much slower there, docs/training.md)
    args.encoder, preset = xp.encoder_preset(args.encoder, args.encoder_preset, use_cuda=device.type == "cuda")

    # seeding (each rank its own seed and envs)
    xp.seed_everything(args.seed + rank, args.torch_threads, args.torch_deterministic)

    envs = VecTradingCore(market, E, split=args.split, mode="portfolio", config=env_cfg, seed=args.seed + rank)
    saved = (
        xp.load_for_evaluation(args.eval_checkpoint, market, "mappo_master.py", data=args.data)
        if args.eval_checkpoint
        else None
    )
    if saved:  # a saved master keeps its own networks (per-symbol or shared heads, as they were trained)
        args.encoder, preset = saved["encoder"], f"from {args.eval_checkpoint}"
        args.master_inputs = saved["args"].get("master_inputs", "full")  # its actor's inputs, as it was trained
        args.master_actor_hidden = tuple(saved["args"].get("master_actor_hidden", (256, 256)))
        shared = saved["model"]["symbols.actor.weights.0"].shape[0] == 1 and S > 1
        agent = SymbolPolicy(S, args.encoder, shared_heads=shared, directive_dim=4)
    elif args.symbol_checkpoint:
        agent, args.encoder = xp.load_symbol_agents(args.symbol_checkpoint, S, market=market, data=args.data)
        preset = f"from {args.symbol_checkpoint}"
    else:
        args.encoder = set_input_shapes(args.encoder, envs.observation_shapes)
        agent = SymbolPolicy(S, args.encoder, directive_dim=4)
    agent = agent.to(device).requires_grad_(not args.freeze_symbols)
    states = market_state(market)  # (T, 13): the master reads the market itself (the symbol agents may not see it)
    global_dim = global_features(envs.obs, envs.directive_index, np.zeros((E, S), np.int64), states[envs.t],
                                 np.zeros(E), args.master_inputs).shape[1]  # fmt: skip
    embed = args.master_inputs == "full"  # whether the master pools the symbol agents' embeddings
    embed_dim = args.encoder.output_dim if embed else 0
    master = MasterNetwork(embed_dim, global_dim, state_dim=envs.state_dim, actor_hidden=args.master_actor_hidden)
    master = master.to(device)
    log_ent_coef = np.full(len(DIRECTIVE_SHAPE), np.log(args.master_ent_coef))  # per head: risk, concentration, mode
    value_norm = ValueNorm().to(device)
    model = nn.ModuleDict({"symbols": agent, "master": master, "value_norm": value_norm})  # one checkpoint
    xp.broadcast_parameters(model, args.world_size)  # identical initial weights on every rank
    groups = [{"params": list(master.parameters()), "lr": args.master_learning_rate}]
    if not args.freeze_symbols:
        groups.append({"params": list(agent.parameters()), "lr": args.learning_rate})
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.Adam(groups, eps=1e-5)
    global_step, start_iteration = 0, 1
    next_obs_np = envs.reset(seed=args.seed + rank)
    # the paired reward's shadow account: the same symbol agents on the neutral directive over the same bars (the two
    # cores draw the same episode starts from the same seed, and a stopped-out account restarts at the same clock)
    shadow = VecTradingCore(market, E, split=args.split, mode="portfolio", config=env_cfg, seed=args.seed + rank)
    shadow_obs = shadow.reset(seed=args.seed + rank)
    anchor, frozen_book = NEUTRAL_DIRECTIVE, frozen_agents and not saved
    fixed = None  # every constant directive on --split (the best constant and each book's bar moments), when needed
    if frozen_book and (args.risk_aversion is None or args.master_anchor == "best_constant"):
        fixed = fit_fixed_directive(argmax_policy(agent, device), market, env_cfg, args.seed, I, split=args.split)
    lam_source = "--risk-aversion"
    if args.risk_aversion is None:  # resolved once and saved with the run's settings (a resumed run keeps it)
        args.risk_aversion = calibrated_risk_aversion(fixed) if fixed else FALLBACK_RISK_AVERSION
        lam_source = f"calibrated on the best constant's {args.split} book" if fixed else "fallback: agents still train"
        if fixed and args.risk_aversion == FALLBACK_RISK_AVERSION:
            lam_source = f"fallback: the best constant directive lost on {args.split}"
    if args.master_anchor == "best_constant" and not saved:  # fitted on --split; the actor starts biased toward it
        anchor = fixed["best"]
        with torch.no_grad():
            bias = master.actor[-1].bias  # (5 + 4 + 3,) the factored heads' logits
            for offset, coord in zip(HEAD_OFFSETS, np.unravel_index(anchor, DIRECTIVE_SHAPE), strict=True):
                bias[offset + coord] += args.anchor_bias
    if args.master_norm == "on" and not saved:  # a saved master keeps its standardisation (buffers of its weights)
        recent_sd = float(np.sqrt(I * fixed["bar_mean_sq"][fixed["best"]])) if fixed else 1.0
        master.set_input_norm(*input_norm(states, market.splits[args.split], args.master_inputs, global_dim, recent_sd))
    if args.master_heads == "risk" and not saved:  # a saved master keeps its pins (a buffer of its weights)
        master.pin_heads(anchor, heads=(HEAD_NAMES.index("concentration"), HEAD_NAMES.index("mode")))
    if args.master_risk_levels == "flat_or_anchor" and not saved:
        master.restrict_head(HEAD_NAMES.index("risk"), {0, int(np.unravel_index(anchor, DIRECTIVE_SHAPE)[0])})
    shadow.set_directives(np.full(E, anchor))
    # --master-advantage counterfactual: two twins of the master account play each side of the switch out
    twin = lambda: VecTradingCore(market, E, split=args.split, mode="portfolio", config=env_cfg)  # noqa: E731
    twins = [twin(), twin()] if counterfactual else []
    track = {"dd": np.zeros(E), "shadow_dd": np.zeros(E)}  # master reward trackers per env: the last drawdowns
    last_actions = np.zeros((E, S), np.int64)
    sampled = not args.freeze_symbols or args.frozen_sampling  # trained symbol agents sample (PPO is on-policy)

    fingerprint = xp.market_fingerprint(market)  # stored with every checkpoint: what the weights were trained on
    if args.resume:
        resumed = xp.resume_run(
            args.resume, model, optimizer, device, rank, args.world_size, market, args.num_iterations, args
        )
        global_step, extra, own, run_dir = resumed
        start_iteration = extra["iteration"] + 1
        envs.set_state(own["core"])  # in place: next_obs_np is envs.obs
        shadow.set_state(own["shadow"])
        log_ent_coef = own["log_ent_coef"].numpy()
        track = {k: v.numpy() for k, v in own["track"].items()}
        last_actions = own["last_actions"].numpy()
    else:
        run_dir = Path(args.run_dir) / f"{args.exp_name}__{xp.data_tag(args.data)}__{args.seed}__{int(time.time())}"
    if saved:  # --eval-checkpoint: no training, straight to the final backtest
        model.load_state_dict(saved["model"])
        global_step, start_iteration = saved["global_step"], args.num_iterations + 1
        run_dir = run_dir.with_name(run_dir.name + "__eval")

    writer, mlflow = None, None
    if rank == 0:
        writer, mlflow = xp.open_run(run_dir, args, global_step, market, device)
        if saved:  # evaluation: no training, so no rollout sizes
            print(f"run {run_dir} | evaluating {args.eval_checkpoint} ({S} symbols, step {global_step}) | "
                  f"{args.encoder.kind} on {device}")  # fmt: skip
        else:
            paired = args.master_reward == "paired"
            print(
                f"run {run_dir} | {S} symbols x {E} envs x {T} steps x {args.world_size} rank(s), {M * E} master "
                f"decisions per rank and iteration, {args.num_iterations} iterations | encoder preset {preset}: "
                f"{args.encoder.kind} on {device} | symbol agents {'frozen' if args.freeze_symbols else 'trained'}"
                + (f" | paired reward, risk aversion {args.risk_aversion:.4g} ({lam_source})" if paired else "")
            )

    # ALGO Logic: Storage setup. Symbol level (T, E, S, ...) as in ppo_symbol_agent.py (frozen agents: the masks
    # only, for the telemetry); master level (M, E, ...).
    obs = {
        k: torch.zeros((T, E, S) + tuple(shape), dtype=torch.int8 if k == "action_mask" else torch.float32)
        for k, shape in envs.observation_shapes.items()
        if k == "action_mask" or not args.freeze_symbols
    }
    obs = {k: v.to(device) for k, v in obs.items()}
    actions = torch.zeros((T, E, S), dtype=torch.long, device=device)
    logprobs, rewards, values, final_values = (torch.zeros((T, E, S), device=device) for _ in range(4))
    terminateds, truncateds = (torch.zeros((T, E, S), dtype=torch.bool, device=device) for _ in range(2))
    policy_actions, executed_actions = np.zeros((T, E, S), np.int8), np.zeros((T, E, S), np.int8)
    m_emb = torch.zeros((M, E, S, embed_dim), device=device)
    m_glob = torch.zeros((M, E, global_dim), device=device)
    m_state = torch.zeros((M, E, envs.state_dim), device=device)
    m_actions = torch.zeros((M, E), dtype=torch.long, device=device)
    m_logprobs, m_raw_values, m_values, m_rewards, m_final_values = (
        torch.zeros((M, E), device=device) for _ in range(5)
    )
    m_terms, m_truncs = (torch.zeros((M, E), dtype=torch.bool, device=device) for _ in range(2))
    m_alt_actions = torch.zeros((M, E), dtype=torch.long, device=device)  # counterfactual: the other side,
    m_cf = torch.zeros((M, E, 2), device=device)  # R(s, a) of the chosen side and of the other,
    m_cf_valid = torch.zeros((M, E), dtype=torch.bool, device=device)  # at the decision points played out
    bench_close = market.data.benchmark
    start_time, start_step = time.time(), global_step
    last_eval, last_telemetry, stop, stopping, sps = {}, {}, xp.stop_on_sigint(), False, 0

    def master_value(o, rows, bars, recent):
        """Denormalised centralised value (len(rows),) of the observation dict o (of bars `bars`) at env rows `rows`,
        with the book's recent returns `recent` (len(rows),)."""
        sub = {k: v[rows] for k, v in o.items()}
        glob = global_features(
            sub, envs.directive_index[rows], last_actions[rows], states[bars[rows]], recent, args.master_inputs
        )
        emb, glob, st = master_inputs(agent, sub, glob, envs.state(o)[rows], device, embed)
        with torch.no_grad():
            v = master.get_value(emb, glob, st)
        return value_norm.denormalize(v) if args.value_norm else v

    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = frac * lr

        t_rollout = time.time()
        tele, m_comps, episodes, policy_entropy = {}, {}, {}, 0.0
        for step in range(T):
            global_step += E * S * args.world_size
            k = step // I
            if step % I == 0:  # ALGO LOGIC: the master decides; the directive rewrites this bar's masks at once
                if (shadow.t != envs.t).any():
                    raise RuntimeError("the shadow account's clock left the master account's; this is a bug.")
                recent = envs.recent_return(I)[:, 0]  # (E,) the book's return over the last decision interval
                glob = global_features(
                    next_obs_np, envs.directive_index, last_actions, states[envs.t], recent, args.master_inputs
                )
                emb, glob, state = master_inputs(agent, next_obs_np, glob, envs.state(), device, embed)
                with torch.no_grad():
                    m_logits, raw_value = master(emb, glob, state)
                    directive, logprob, _, _ = masked_policy(m_logits)
                m_emb[k], m_glob[k], m_state[k] = emb, glob, state
                m_actions[k], m_logprobs[k], m_raw_values[k] = directive, logprob, raw_value
                m_values[k] = value_norm.denormalize(raw_value) if args.value_norm else raw_value
                envs.set_directives(directive.cpu().numpy())
                sums = {key: np.zeros(E) for key in INGREDIENTS}
                alive = np.ones(E, dtype=bool)
                m_cf_valid[k] = play_out = counterfactual and k % args.master_cf_every == 0
                if play_out:  # both sides played out from here
                    m_alt_actions[k] = other_side(m_logits, directive)
                    sides = (directive.cpu().numpy(), m_alt_actions[k].cpu().numpy())
                    played = counterfactual_rewards(envs, twins, sides, anchor, agent, device, args, track["dd"],
                                                    bench_close)  # fmt: skip
                    m_cf[k] = torch.as_tensor(played.T, dtype=torch.float32, device=device)
                m_terms[k], m_truncs[k], m_final_values[k] = False, False, 0.0
            for key, v in obs.items():
                v[step].copy_(torch.as_tensor(next_obs_np[key]))
            if args.freeze_symbols:  # frozen agents: argmax by default, the book the backtest tests
                action = torch.as_tensor(symbol_actions(agent, next_obs_np, device, deterministic=not sampled))
            else:
                step_obs = {key: v[step] for key, v in obs.items()}
                with torch.no_grad():
                    logits, value = agent(step_obs)
                    action, logprob, entropy, choice = masked_policy(logits)
                actions[step], logprobs[step], values[step] = action, logprob, value
                policy_entropy += choice_mean(entropy, choice).item() / T
            shadow_obs, _, _, _, shadow_info = shadow.step(symbol_actions(agent, shadow_obs, device, not sampled))

            next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            rewards[step] = torch.as_tensor(reward, device=device)
            terminateds[step] = torch.as_tensor(terminated, device=device)
            truncateds[step] = torch.as_tensor(truncated, device=device)
            bootstrap = truncated & ~terminated  # (E, S): value of the ended episode's last observation
            final_values[step] = 0.0
            if bootstrap.any() and not args.freeze_symbols:
                rows = bootstrap.any(1)
                with torch.no_grad():
                    v_final = agent.get_value(to_torch({key: a[rows] for key, a in info["final_obs"].items()}, device))
                final_values[step][torch.as_tensor(rows, device=device)] = v_final
            last_actions = info["policy_action"].astype(np.int64)

            # ALGO LOGIC: master reward ingredients of this bar, counted until the episode ends
            done_env = (terminated | truncated).any(1)
            dd, dd_sh, bar = info["drawdown"][:, 0], shadow_info["drawdown"][:, 0], info["bar"]  # before any restart
            ingredients = bar_ingredients(info, shadow_info, track["dd"], track["shadow_dd"], bench_close,
                                          args.dd_threshold)  # fmt: skip
            for key, x in ingredients.items():
                sums[key] += np.where(alive, x, 0.0)
            m_terms[k] |= torch.as_tensor(alive & terminated.any(1), device=device)
            ended_by_time = alive & truncated.any(1)
            if ended_by_time.any():
                m_final_values[k][torch.as_tensor(ended_by_time, device=device)] = master_value(
                    info["final_obs"], ended_by_time, bar, sums["ret"][ended_by_time]
                )
                m_truncs[k] |= torch.as_tensor(ended_by_time, device=device)
            alive &= ~done_env
            track["dd"], track["shadow_dd"] = np.where(done_env, 0.0, dd), np.where(done_env, 0.0, dd_sh)
            if step % I == I - 1:
                parts = master_reward(sums, args, S)
                m_rewards[k] = torch.as_tensor(sum(parts.values()), dtype=torch.float32, device=device)
                for key, v in parts.items():
                    m_comps[key] = m_comps.get(key, 0.0) + float(v.mean()) / M

            # telemetry: per-step means, summed over the rollout
            policy_actions[step], executed_actions[step] = info["policy_action"], info["executed_action"]
            add_step_telemetry(tele, episodes, info, T)
        rollout_seconds = time.time() - t_rollout

        # ALGO LOGIC: advantages with bootstrap at truncation, for both levels
        t_update = time.time()
        with torch.no_grad():
            if not args.freeze_symbols:
                next_value = agent.get_value(to_torch(next_obs_np, device))
                advantages, returns = compute_gae(
                    rewards, values, terminateds, truncateds, final_values, next_value, args.gamma, args.gae_lambda
                )
            m_next_value = master_value(next_obs_np, np.ones(E, dtype=bool), envs.t, envs.recent_return(I)[:, 0])
            m_advantages, m_returns = compute_gae(
                m_rewards, m_values, m_terms, m_truncs, m_final_values, m_next_value, args.master_gamma,
                args.master_gae_lambda,
            )  # fmt: skip
            if args.value_norm:  # PopArt-lite: the critic regresses normalised returns; every rank's normaliser sees
                value_norm.update(
                    xp.cat_over_ranks(m_returns, args.world_size)
                )  # every rank's returns (they stay equal)
            m_targets = value_norm.normalize(m_returns) if args.value_norm else m_returns

        # ALGO LOGIC: symbol agents, PPO-clip over (T * E) env-steps that keep the symbol axis
        clipfracs, pg_loss, v_loss, entropy_loss, approx_kl, old_approx_kl = [], *(torch.zeros(()),) * 5
        if not args.freeze_symbols:
            b_obs = {key: v.reshape((T * E,) + v.shape[2:]) for key, v in obs.items()}
            b_logprobs, b_actions = logprobs.reshape(T * E, S), actions.reshape(T * E, S)
            b_advantages, b_returns, b_values = (x.reshape(T * E, S) for x in (advantages, returns, values))
            b_inds = np.arange(T * E)
            mb_rows = (T * E) // args.num_minibatches
        for _epoch in range(0 if args.freeze_symbols else args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, T * E, mb_rows):
                mb_inds = torch.as_tensor(b_inds[start : start + mb_rows], device=device)
                mb_obs = {key: v[mb_inds] for key, v in b_obs.items()}
                logits, newvalue = agent(mb_obs)  # (mb, S, 7) logits masked by the rollout's mask, (mb, S)
                _, newlogprob, entropy, choice = masked_policy(logits, b_actions[mb_inds])
                pg_loss, v_loss, old_approx_kl, approx_kl, clipfrac = ppo_loss(
                    newlogprob, b_logprobs[mb_inds], b_advantages[mb_inds], newvalue, b_values[mb_inds],
                    b_returns[mb_inds], args.clip_coef, args.clip_vloss, args.norm_adv,
                )  # fmt: skip
                clipfracs.append(clipfrac)

                entropy_loss = choice_mean(entropy, choice)  # normalised entropy (1 = uniform over allowed actions)
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                if args.world_size > 1:
                    xp.allreduce_grads(agent, args.world_size)
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and xp.mean_over_ranks(approx_kl, args.world_size) > args.target_kl:
                break

        # ALGO LOGIC: master, PPO-clip over (M * E) decisions; the centralised critic reads the global state
        mb_inds_all = np.arange(M * E)
        flat = lambda x: x.reshape((M * E,) + x.shape[2:])  # noqa: E731
        mb_emb, mb_glob, mb_state = flat(m_emb), flat(m_glob), flat(m_state)
        mb_act, mb_logp, mb_adv, mb_tgt, mb_old = map(
            flat, (m_actions, m_logprobs, m_advantages, m_targets, m_raw_values)
        )
        mb_alt, mb_cf, mb_valid = flat(m_alt_actions), flat(m_cf), flat(m_cf_valid)
        spread = (mb_cf[..., 0] - mb_cf[..., 1])[mb_valid]
        cf_scale = float(spread.std()) + 1e-8 if len(spread) > 1 else 1.0  # the two sides' spread
        m_clipfracs, head_entropy = [], np.zeros(len(DIRECTIVE_SHAPE))
        ent_coef = torch.as_tensor(np.exp(log_ent_coef), dtype=torch.float32, device=device)  # (3,) per head
        m_epochs = args.master_update_epochs or args.update_epochs  # None: the symbol agents' setting
        m_minibatches = min(args.master_num_minibatches or args.num_minibatches, M * E)
        for _epoch in range(m_epochs):
            np.random.shuffle(mb_inds_all)
            for idx in np.array_split(mb_inds_all, m_minibatches):
                j = torch.as_tensor(idx, device=device)
                logits, newvalue = master(mb_emb[j], mb_glob[j], mb_state[j])
                _, newlogprob, entropy, _ = masked_policy(logits, mb_act[j])
                m_pg_loss, m_v_loss, _, m_approx_kl, clipfrac = ppo_loss(
                    newlogprob, mb_logp[j], mb_adv[j], newvalue, mb_old[j], mb_tgt[j], args.clip_coef,
                    args.clip_vloss, args.norm_adv,
                )  # fmt: skip
                m_clipfracs.append(clipfrac)
                if counterfactual:  # the all-action loss replaces the sampled side's clipped surrogate
                    v = mb_valid[j]  # the decisions played out (a minibatch without one leaves the actor alone)
                    m_pg_loss = (
                        all_action_loss(logits[v], mb_act[j][v], mb_cf[j][v, 0], mb_alt[j][v], mb_cf[j][v, 1], cf_scale)
                        if v.any()
                        else logits.sum() * 0.0
                    )
                m_entropy = entropy.mean()  # of the joint directive, normalised by log(60)
                heads = master.head_entropies(mb_emb[j], mb_glob[j]).mean(0)  # (3,) normalised, per head
                head_entropy += heads.detach().cpu().numpy() / (m_epochs * m_minibatches)
                loss = m_pg_loss - (ent_coef * heads).sum() + m_v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                if args.world_size > 1:
                    xp.allreduce_grads(master, args.world_size)
                nn.utils.clip_grad_norm_(master.parameters(), args.max_grad_norm)
                optimizer.step()

        # entropy target per head: the log coefficient moves toward more bonus when a head is below the target
        moved = np.clip(log_ent_coef + args.master_ent_lr * (args.master_ent_target - head_entropy), -12, 0)
        log_ent_coef = np.where(master.free_heads(), moved, log_ent_coef)  # a pinned head has no entropy to keep
        explained_var = np.nan
        if not args.freeze_symbols:
            y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
            explained_var = np.nan if np.var(y_true) == 0 else 1 - np.var(y_true - y_pred) / np.var(y_true)
        m_pred, m_true = m_values.cpu().numpy(), m_returns.cpu().numpy()
        m_explained_var = np.nan if np.var(m_true) == 0 else 1 - np.var(m_true - m_pred) / np.var(m_true)
        update_seconds = time.time() - t_update

        stopping = xp.all_ranks_stop(stop, args.world_size)

        # checkpoint: every rank's envs (next observation included), RNG and trackers, gathered on rank 0
        periodic = iteration % max(args.eval_interval, 1) == 0 or iteration == args.num_iterations
        if args.save_model and (periodic or stopping):
            own = {"core": envs.get_state(), "shadow": shadow.get_state(), "last_actions": last_actions,
                   "track": track, "log_ent_coef": log_ent_coef}  # fmt: skip
            extra = {"iteration": iteration, "market": fingerprint}
            xp.save_run_checkpoint(run_dir, model, optimizer, args, global_step, own, extra, rank)
        if rank != 0:
            if stopping:
                break
            continue
        telemetry = telemetry_metrics(tele, policy_actions, executed_actions, obs["action_mask"].cpu().numpy())
        coords = np.stack(np.unravel_index(m_actions.cpu().numpy(), DIRECTIVE_SHAPE), -1).reshape(-1, 3)
        metrics = telemetry | {
            "charts/learning_rate": optimizer.param_groups[-1]["lr"],
            "charts/master_learning_rate": optimizer.param_groups[0]["lr"],
            "charts/policy_entropy": policy_entropy,
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
            **{f"master/entropy_{h}": float(v) for h, v in zip(HEAD_NAMES, head_entropy, strict=True)},
            **{f"master/ent_coef_{h}": float(np.exp(v)) for h, v in zip(HEAD_NAMES, log_ent_coef, strict=True)},
            "master_reward/total": m_rewards.mean().item(),
            "reward/total": rewards.mean().item(),
            "perf/rollout_seconds": rollout_seconds,
            "perf/update_seconds": update_seconds,
        }
        metrics.update({f"master_reward/{key}": v for key, v in m_comps.items()})
        if counterfactual:  # at the decisions played out: which side paid more, and what the drawn side gave up
            risk = torch.as_tensor(np.unravel_index(m_actions.cpu().numpy(), DIRECTIVE_SHAPE)[0], device=device)
            flat_chosen = (risk == 0)[m_cf_valid]
            chosen, other = m_cf[..., 0][m_cf_valid], m_cf[..., 1][m_cf_valid]
            flat_reward = torch.where(flat_chosen, chosen, other)
            anchor_reward = torch.where(flat_chosen, other, chosen)
            metrics["master/counterfactual_flat_share"] = (flat_reward > anchor_reward).float().mean().item()
            metrics["master/counterfactual_regret"] = (torch.maximum(chosen, other) - chosen).mean().item()
        if episodes:
            metrics["charts/episodic_return"] = float(np.mean(episodes["reward"]))  # sum of rewards
            metrics["charts/episodic_length"] = float(np.mean(episodes["length"]))
            metrics["charts/ep_unique_actions"] = float(np.mean(episodes["unique_actions"]))
            metrics.update({f"trading/episode_{key}": float(np.mean(v)) for key, v in episodes.items()})
        if args.eval_interval and (iteration % args.eval_interval == 0 or iteration == args.num_iterations):
            t_eval = time.time()
            chooser = master_policy(agent, master, device, states, I, args.master_inputs)
            policy = argmax_policy(agent, device)
            report = run_backtest(policy, market, args.eval_split, env_cfg, args.seed, "portfolio", chooser, I)
            last_eval = {key: v for key, v in report["agent"].items() if v is not None}
            metrics.update({f"trading/{args.eval_split}_{key}": v for key, v in last_eval.items()})
            metrics["perf/eval_seconds"] = time.time() - t_eval
        sps = int((global_step - start_step) / (time.time() - start_time))
        eta = (time.time() - start_time) / (iteration - start_iteration + 1) * (args.num_iterations - iteration)
        metrics["charts/SPS"] = sps
        xp.log_scalars(writer, mlflow, metrics, global_step)
        print(
            f"iter {iteration}/{args.num_iterations} ETA {eta / 60:.1f} min global_step={global_step} SPS={sps} "
            f"master_reward={metrics['master_reward/total']:.3f} risk_level={coords[:, 0].mean():.2f} "
            f"regime_level={coords[:, 2].mean():.2f} reward={metrics['reward/total']:.4f}"
            + (f" {args.eval_split}_max_drawdown={last_eval['max_drawdown']:.3f}" if "perf/eval_seconds" in metrics
               else "")
        )  # fmt: skip
        last_telemetry = xp.summary_telemetry(metrics)
        if stopping:
            break

    if stopping:  # interrupted: no backtest, the folder stays marked incomplete, exit status 130
        xp.exit_interrupted(writer, run_dir, global_step, args.save_model, rank, args.world_size)
    xp.stop_at_once_on_sigint()

    # final backtest on the test split: the learned master beside fixed, exposure-matched and rule-based masters
    if rank == 0:
        t_eval = time.time()
        title = f"{run_dir.name}, {args.test_split} split"
        print(f"final backtest on the {args.test_split} split: the master and every fixed and rule-based master")
        symbols_policy, make_master = (
            argmax_policy(agent, device),
            lambda: master_policy(agent, master, device, states, I, args.master_inputs),
        )
        final = master_final_report(symbols_policy, make_master, market, args.test_split, env_cfg, args.seed, I,
                                    args.stress, run_dir, writer, fit_split=args.split)  # fmt: skip
        reports, results, go, why, stress = (final[k] for k in ("reports", "results", "go", "why", "stress"))
        curves = {name: r["curve"] for name, r in results.items()}
        print(format_go_criterion(go))
        figures = backtest_figures(curves, results["master"]["series"], envs.symbols, title, lead="master")
        figures["directives"] = directive_figure(results["master"]["series"], market, title)
        writer.add_scalar("trading/drawdown_cut_vs_matched_best_constant", go["drawdown_cut_vs_matched_best_constant"],
                          global_step)  # fmt: skip
        xp.finish_run(run_dir, writer, mlflow, args, figures, reports["master"], global_step, t_eval,
                   encoder=args.encoder.kind, sps=sps, backtest=reports, go_criterion=go, directive_analysis=why,
                   val=last_eval, telemetry=last_telemetry, stress=stress)  # fmt: skip
    if args.world_size > 1:  # every rank must end with rank 0's weights (same init, same all-reduced gradients)
        xp.assert_ranks_agree([*model.parameters(), *model.buffers()], rank)
    xp.leave_distributed(args.world_size)
