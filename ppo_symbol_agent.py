"""PPO for the symbol agents: one shared encoder, per-symbol heads batched over S, trained on the vectorised core.

Every (env, symbol) slot trades its own account (independent mode). One rollout holds T x E x S symbol-steps and
``global_step`` counts symbol-steps, so ``total_timesteps`` and ``charts/SPS`` are in symbol-steps too.

    python ppo_symbol_agent.py --ent-coef 0.08 --seed 42
    torchrun --standalone --nproc_per_node 2 ppo_symbol_agent.py --num-envs 4     # data parallel
    tensorboard --logdir runs

The exploration stack (entropy schedule, adaptive bonus, guard; `scheduled_ent_coef`, `update_entropy_control`)
acts on entropy normalised by log(number of allowed actions); docs/training.md has the formulas.
"""

from __future__ import annotations

import copy
import math
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
    agent_final_report,
    explain_decisions,
    run_backtest,
    saliency_figure,
    save_explanation,
)
from encoders import MASKED_LOGIT, RET_1, EncoderConfig, SymbolPolicy, lagged_correlation, set_input_shapes
from market_data import DataConfig
from trading_env import (
    INCREASE_ACTIONS,
    EnvConfig,
    VecTradingCore,
    add_step_telemetry,
    telemetry_metrics,
)

# Direction of each action for the supervised prior: +1 adds exposure, -1 removes it, 0 holds.
ACTION_DIRECTION = (0.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0)


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
    explain: bool = False
    """with --eval-checkpoint: also explain the agent's decisions on the test split: an integrated-gradients saliency
map of the chosen action over the lookback bars and features (<split>_saliency.png) and its direction against the
supervised prior's, with what followed (explain.md, explain.json; docs/explain.md)"""
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

    # --- environment ---
    data: DataConfig = field(default_factory=DataConfig)
    """market data: synthetic market or the user's files, features, splits"""
    env: EnvConfig = field(default_factory=EnvConfig)
    """trading environment: capital, costs, slippage, limits, reward weights"""
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(dropout=0.0))
    """encoder sizes (see --encoder-preset; dropout 0 keeps PPO's importance ratio exact)"""
    hold_bias: float = 2.0
    """initial logit of HOLD over the other actions: at 2, a flat agent starts by trading about 30% of the bars, not
the 75% of a uniform choice among HOLD and the three BUYs; trading is what it has to learn to earn"""
    shared_heads: bool = True
    """one actor-critic head pair for every symbol (each learns from all symbols' data) instead of one per symbol"""
    split: Literal["train", "val", "test"] = "train"
    """split the agents train on (random episode starts inside it)"""
    eval_split: Literal["train", "val", "test"] = "val"
    """split of the periodic deterministic evaluation (a sequential sweep)"""
    eval_interval: int = 10
    """evaluate on eval_split and checkpoint (with --save-model) every this many iterations and at the end; 0: no
periodic evaluation, a checkpoint every iteration"""
    test_split: Literal["train", "val", "test"] = "test"
    """split of the final backtest"""
    final_weights: Literal["best_val", "last"] = "best_val"
    """weights of the final backtest: those of the best periodic evaluation on --eval-split (model selection on
the validation split; the test split stays unseen), or the last ones"""
    stress: bool = True
    """stress tests in the final report: costs x2 and x3, impact x5, one bar of latency, the worst crash replayed,
and without each of the 5 largest contributors"""
    eval_samples: int = 3
    """sampling seeds of the stochastic policy in the final backtest (reported as their mean, beside argmax)"""

    # --- encoder initialisation (docs/training.md, "Pretraining and warm start") ---
    pretrain: Literal["none", "masked", "direction", "next_return"] = "none"
    """fit the encoder before PPO on observations of the bars of --split (the flat account's, as the agents see them;
no later bar): masked (masked-forecast pretraining, self-supervised: 15% of the lookback bars, at least one, are
zeroed and their features reconstructed from the embedding) or direction (SL-to-RL warm start: the supervised
signals' label, log(close[t + h] / close[t]) > --data.sl-threshold with h = --data.sl-horizon, classified from the
embedding; labels whose horizon leaves the split are dropped), next_return (every symbol's next-bar ret_1 regressed
on its embedding, the symbols of a bar together, so that an --encoder.cross-symbol block is fitted with the
encoder; bars whose next bar leaves the split are dropped); none: random initialisation. The encoder (and block) of
the epoch with the lowest pretext loss on --eval-split is kept (the losses are logged as pretrain/*) and saved with
its provenance (pretrained_encoder.pt)"""
    pretrain_samples: int = 100_000
    """--pretrain: (bar, symbol) observations drawn from --split (and a fifth as many from --eval-split to score it)"""
    pretrain_epochs: int = 5
    """--pretrain: passes over the samples (minibatches of 512, Adam at 1e-3)"""

    # --- staged symbol onboarding ---
    curriculum: tuple[float, ...] = ()
    """staged onboarding: the shares of the symbols that may trade in successive stages of equal length over the
first --curriculum-span of training, e.g. --curriculum 0.1 0.3 0.6 (then every symbol); a symbol not yet onboarded
is HOLD-only in the rollouts (it never buys, so it holds nothing to sell) and stays in every observation; symbols
join in a fixed random order drawn from --seed; the periodic evaluation and the final backtest trade every symbol;
empty (the default): every symbol from the start"""
    curriculum_span: float = 0.5
    """--curriculum: the share of --total-timesteps over which its stages run"""

    # --- algorithm ---
    total_timesteps: int = 4_000_000
    """total symbol-steps of the experiment (all ranks together)"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    num_envs: int | None = None
    """the number of parallel environments per rank (each trades all symbols); left out: about 10,240 symbol-steps a
rollout, 16 envs up to 10 symbols and 1 at 143 (experiment.resolve_num_envs: at 143 symbols 16 envs made too few
updates)"""
    num_steps: int = 64
    """the number of steps per environment per rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.9
    """the discount factor gamma (0.9: a horizon of ~10 bars; the planted edge lives one bar ahead)"""
    gae_lambda: float = 0.8
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 8
    """the number of mini-batches (split over env-steps; each keeps all S symbols)"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.08
    """initial entropy coefficient (start of the hold_then_linear schedule)"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold (stops the epochs of an update early)"""

    # --- entropy control. Entropies are normalised: nats / log(number of allowed actions), 1 = uniform over what is
    # allowed. Step counts are symbol-steps. ---
    ent_schedule: Literal["hold_then_linear", "constant"] = "hold_then_linear"
    """entropy coefficient schedule"""
    ent_final: float = 0.003
    """coefficient at the end of the linear decay"""
    ent_hold_steps: int = 500_000
    """symbol-steps at the initial coefficient before the decay starts"""
    ent_decay_steps: int = 2_000_000
    """symbol-steps of the linear decay"""
    ent_min: float = 0.003
    """floor of the scheduled coefficient"""
    ent_bonus: bool = True
    """adaptive entropy bonus: raise the coefficient when the policy entropy is under the target"""
    ent_bonus_target: float = 0.40
    """target mean normalised entropy of the policy over states with a choice"""
    ent_bonus_scale: float = 0.35
    """bonus multiplier slope: 1 + scale * relative shortfall"""
    ent_bonus_warmup: int = 200_000
    """symbol-steps before the bonus acts"""
    ent_guard: bool = True
    """action-entropy guard: boost the coefficient when the chosen actions' entropy collapses"""
    ent_guard_threshold: float = 0.11
    """guard threshold on charts/policy_action_entropy_mean (normalised)"""
    ent_guard_warmup: int = 200_000
    """symbol-steps before the guard acts"""
    ent_guard_boost: float = 1.5
    """factor applied to the guard multiplier at each intervention"""
    ent_guard_max_mult: float = 5.0
    """cap of the guard multiplier"""
    ent_guard_relax: float = 0.9
    """factor pulling the guard multiplier back toward 1 on a healthy rollout"""
    kl_prior_coef: float = 0.02
    """initial weight of the supervised prior, E_pi[-log q] (KL(pi || q) without pi's entropy); 0 disables it"""
    kl_prior_anneal_steps: int = 200_000
    """symbol-steps over which the prior's weight falls linearly to 0"""
    aux_next_return: float = 0.0
    """weight of an auxiliary loss: a linear read-out of the policy's embedding predicts each symbol's next bar
return (the next observation's ret_1, known one step after the decision and never an input), its mean squared error
in units of the rollout's standard deviation added to the PPO loss; the supervised gradient meant to teach the
cross-symbol block (--encoder.cross-symbol) which symbol leads which (docs/training.md). 0 turns it off"""
    graph_from_train: float = 0.0
    """with --encoder.cross-symbol attention: start the block's learned graph G (every head) at this scale times the
lagged correlation of the symbols' ret_1 on --split, corr(r_i[t], r_j[t - 1]) over its bars: the lead-lag graph
fitted in closed form on the training bars instead of by gradient from zero (docs/training.md); 0: G starts at 0"""
    kl_prior_temperature: float = 4.0
    """sharpness of the prior: logit of an action = temperature * direction * (mean sl_prob - 0.5)"""

    # --- filled in at runtime (not flags) ---
    num_symbols: int = field(default=0, init=False)
    """symbols per environment (from the data)"""
    batch_size: int = field(default=0, init=False)
    """symbol-steps per rollout per rank (num_steps * num_envs * num_symbols)"""
    minibatch_size: int = field(default=0, init=False)
    """symbol-steps per minibatch"""
    num_iterations: int = field(default=0, init=False)
    """the number of iterations (computed in runtime)"""
    world_size: int = field(default=1, init=False)
    """torchrun processes"""


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: masked sampling, GAE and the PPO-clip loss (the same lines stand in mappo_master.py, as CleanRL does)
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


def agent_policy(agent: nn.Module, device, sample_seed: int | None = None, record: list | None = None):
    """The agent's policy as a function of a numpy observation dict, for run_backtest: argmax, or sampled with a
    generator of its own (sample_seed). With `record` (a list), each call appends (ret_1, P(increase exposure),
    increase allowed), each (S,), for the decile diagnostic."""
    gen = None if sample_seed is None else torch.Generator(device=device).manual_seed(sample_seed)

    def act(obs):
        with torch.no_grad():
            logits = agent.get_logits(to_torch(obs, device))  # (1, S, 7) masked
            p = torch.softmax(logits.float(), -1)
            if record is not None:
                can = obs["action_mask"][0][:, INCREASE_ACTIONS].any(-1)
                record.append(
                    (obs["technical"][0, :, -1, 0].copy(), p[0, :, INCREASE_ACTIONS].sum(-1).cpu().numpy(), can)
                )
            if gen is None:
                return logits.argmax(-1).cpu().numpy()
            return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen).reshape(p.shape[:-1]).cpu().numpy()

    return act


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
# ALGO LOGIC: schedules, priors and advantages (pure functions, unit-tested in tests/test_ppo_symbol_agent.py)
# ---------------------------------------------------------------------------------------------------------------
def scheduled_ent_coef(args: Args, step: int) -> float:
    """hold_then_linear: initial for hold_steps, linear to final over decay_steps, never below ent_min."""
    if args.ent_schedule == "constant":
        return args.ent_coef
    frac = min(max(step - args.ent_hold_steps, 0) / max(args.ent_decay_steps, 1), 1.0)
    return max(args.ent_coef + frac * (args.ent_final - args.ent_coef), args.ent_min)


def update_entropy_control(args: Args, ctl: dict, step: int, policy_entropy: float, action_entropy: float) -> bool:
    """Update the bonus and guard multipliers from the last rollout; returns True when the guard intervened."""
    ctl["bonus_mult"] = 1.0
    if args.ent_bonus and step >= args.ent_bonus_warmup:
        shortfall = max(0.0, args.ent_bonus_target - policy_entropy) / args.ent_bonus_target
        ctl["bonus_mult"] = 1.0 + args.ent_bonus_scale * shortfall
    intervened = False
    if args.ent_guard and step >= args.ent_guard_warmup and action_entropy < args.ent_guard_threshold:
        ctl["guard_mult"] = min(ctl["guard_mult"] * args.ent_guard_boost, args.ent_guard_max_mult)
        ctl["interventions"] += 1
        intervened = True
    else:
        ctl["guard_mult"] = max(1.0, ctl["guard_mult"] * args.ent_guard_relax)
    return intervened


def scheduled_kl_prior_coef(args: Args, step: int) -> float:
    return args.kl_prior_coef * max(0.0, 1.0 - step / max(args.kl_prior_anneal_steps, 1))


def sl_prior_logprobs(sl_probs: torch.Tensor, action_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities (..., 7) of the supervised prior over the allowed actions.

    p = mean of the MLP/LSTM/GRU up-move probabilities; logit_a = temperature * direction_a * (p - 0.5) with
    direction +1 for BUY_SMALL/MEDIUM/LARGE and ADD, -1 for SELL_PARTIAL/SELL_ALL, 0 for HOLD; masked actions get
    -1e8 and the rest is renormalised. p = 0.5 gives the uniform distribution over the allowed actions.
    """
    direction = torch.tensor(ACTION_DIRECTION, dtype=sl_probs.dtype, device=sl_probs.device)
    p = sl_probs.mean(-1, keepdim=True)  # (..., 1)
    logits = temperature * (p - 0.5) * direction  # (..., 7)
    logits = torch.where(action_mask.bool(), logits, torch.full_like(logits, -1e8))
    return torch.log_softmax(logits, dim=-1)


def next_return_targets(technical: torch.Tensor, next_technical: torch.Tensor, ended: torch.Tensor):
    """--aux-next-return's targets for a rollout: technical (T, E, S, L, F) the windows observed at each step,
    next_technical (E, S, L, F) the observation after the last step, ended (T, E, S) bool the steps whose episode
    ended (the next row then starts another episode). Returns (T, E, S) the next bar's ret_1 of each decision, in
    units of its standard deviation over the rollout's valid rows, and (T, E, S) bool valid (not ended)."""
    ret = torch.cat([technical[1:, ..., -1, RET_1], next_technical[None, ..., -1, RET_1]])  # (T, E, S)
    valid = ~ended
    scale = ret[valid].std() if valid.sum() > 1 else ret.new_tensor(1.0)
    return ret / scale.clamp_min(1e-8), valid


def curriculum_tradable(args: Args, global_step: int, num_symbols: int) -> np.ndarray | None:
    """--curriculum: (S,) bool, the symbols that may trade at global_step (None: every symbol). Stage k of
    len(args.curriculum), over the first args.curriculum_span of the run, lets the first ceil(share_k x S) symbols of
    a fixed permutation (seeded by args.seed, the same on every rank) trade; each stage keeps the earlier ones."""
    if not args.curriculum:
        return None
    stage = int(global_step / (args.curriculum_span * args.total_timesteps) * len(args.curriculum))
    if stage >= len(args.curriculum):
        return None
    order = np.random.default_rng(args.seed).permutation(num_symbols)
    tradable = np.zeros(num_symbols, bool)
    tradable[order[: max(1, int(np.ceil(args.curriculum[stage] * num_symbols - 1e-9)))]] = True
    return tradable


def split_lagged_correlation(market, split: str) -> torch.Tensor:
    """(S, S): corr(r_i[t], r_j[t - 1]) of the symbols' ret_1 over the bars of `split` (encoders.lagged_correlation
    over one window, the whole split, back in units of correlation)."""
    lo, hi = market.splits[split]
    returns = torch.as_tensor(market.technical[lo:hi, :, RET_1].T, dtype=torch.float64)  # (S, bars)
    return (lagged_correlation(returns) / math.sqrt(hi - lo - 1)).float()


PRETRAIN_MASK_RATE = 0.15  # --pretrain masked: share of the lookback bars hidden from the encoder


def pretext_samples(market, split: str, env_cfg: EnvConfig, n: int, seed: int, horizon: int, threshold: float):
    """n observations of (bar, symbol) pairs of `split`, the bars drawn uniformly from its decision bars, as the
    agents see them with a flat account (VecTradingCore.observe_flat; no action mask), each one's supervised label
    (market_data.forward_labels), whether it may be used (both bars exist and t + horizon lies inside the split, so
    that no label reads a bar beyond it) and its (bar, symbol)."""
    from market_data import forward_labels

    E = 256
    core = VecTradingCore(market, E, split=split, mode="independent", config=env_cfg, seed=seed)
    rng = np.random.default_rng(seed)
    labels, valid = forward_labels(market.data.close, horizon, threshold)
    hi = market.splits[split][1]
    S = core.num_symbols  # the core trades every symbol of the market, in its order
    parts, ys, oks, where = {}, [], [], []
    for _ in range(-(-n // (E * S))):
        t = rng.integers(core.split_start, core.split_last, size=E)
        o = core.observe_flat(t)
        for k in (k for k in o if k != "action_mask"):
            parts.setdefault(k, []).append(o[k].reshape(E * S, *o[k].shape[2:]).copy())
        ys.append(labels[t].reshape(-1))
        oks.append((valid[t] & (t + horizon < hi)[:, None]).reshape(-1))
        where.append(np.stack(np.broadcast_arrays(t[:, None], np.arange(S)[None, :]), -1).reshape(-1, 2))
    obs = {k: torch.as_tensor(np.concatenate(v)[:n]) for k, v in parts.items()}
    cut = [torch.as_tensor(np.concatenate(x)[:n]) for x in (ys, oks)]
    return obs, *cut, np.concatenate(where)[:n]


def next_return_samples(market, split: str, env_cfg: EnvConfig, n: int, seed: int):
    """--pretrain next_return: observations of about n / S bars of `split` with every symbol (B, S, ...), as
    pretext_samples draws them, each symbol's next-bar ret_1 (B, S) and the bars (B,); bars whose next bar lies
    beyond the split are dropped, so that no target reads a bar outside it."""
    S = market.technical.shape[1]
    obs, _, _, where = pretext_samples(market, split, env_cfg, max(1, n // S) * S, seed, 1, 0.0)
    t = torch.as_tensor(where[::S, 0])  # rows are bar-major: S symbols of one bar after another
    ok = t + 1 < market.splits[split][1]
    obs = {k: v.reshape(len(t), S, *v.shape[1:])[ok] for k, v in obs.items()}
    return obs, torch.as_tensor(market.technical[t[ok] + 1, :, RET_1], dtype=torch.float32), t[ok]


def pretext_batch(objective: str, obs: dict, labels, generator: torch.Generator):
    """The encoder's input and the pretext's target for a batch: masked, the technical window with a random 15% of
    its bars (at least one) zeroed, the target the hidden bars' features and the mask; direction, the observation
    as it is and its label."""
    if objective in ("direction", "next_return"):
        return obs, labels, None
    tech = obs["technical"]  # (N, L, F)
    hide = torch.rand(tech.shape[:2], generator=generator) < PRETRAIN_MASK_RATE  # (N, L)
    none = ~hide.any(1)
    hide[none, torch.randint(tech.shape[1], (int(none.sum()),), generator=generator)] = True
    return {**obs, "technical": tech.masked_fill(hide[..., None], 0.0)}, tech, hide


def pretext_loss(objective: str, head: nn.Module, emb, target, hide) -> torch.Tensor:
    """Masked: mean squared error of the reconstructed features over the hidden bars; direction: binary
    cross-entropy of the label; next_return: mean squared error of the (scaled) next return."""
    out = head(emb)
    if objective == "direction":
        return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), target)
    if objective == "next_return":
        return (out.squeeze(-1) - target).square().mean()
    err = (out.view(target.shape) - target).square().mean(-1)  # (N, L)
    return (err * hide).sum() / hide.sum()


def pretrain_encoder(args: Args, agent: SymbolPolicy, market, device) -> tuple[nn.Module, dict]:
    """--pretrain: fit agent.encoder (and with next_return its cross-symbol block, if any: `fitted`, in place) and
    a linear pretext head on observations of --split, scored on --eval-split; the global RNG states are left as they
    were, so that a pretrained run and a random-init run of the same seed differ only in those weights. Returns the
    fitted module, the provenance and the losses per epoch."""
    objective = args.pretrain
    h, thr = args.data.sl_horizon, args.data.sl_threshold
    cuda = [device.index or 0] if device.type == "cuda" else []  # torch.manual_seed below reseeds CUDA too
    with torch.random.fork_rng(devices=cuda):
        gen = torch.Generator().manual_seed(args.seed)
        fitted, embed, batch, label = agent.encoder, agent.encoder, 512, {"mask_rate": PRETRAIN_MASK_RATE}
        if objective == "next_return":  # every symbol of a bar in one sample: (B, S, ...) -> (B, S)
            n_val = args.pretrain_samples // 5
            train = next_return_samples(market, args.split, args.env, args.pretrain_samples, args.seed)
            val = next_return_samples(market, args.eval_split, args.env, n_val, args.seed + 1)
            scale = float(train[1].std())  # targets in units of the train split's standard deviation
            train, val = ((o, y / scale) for o, y, _ in (train, val))
            both = {"encoder": agent.encoder, "cross": agent.cross}
            fitted = agent.encoder if agent.cross is None else nn.ModuleDict(both)
            embed, batch = agent.embed, max(1, 512 // market.technical.shape[1])
            label = {"target": "next bar's ret_1", "scale": scale}
        else:
            train = pretext_samples(market, args.split, args.env, args.pretrain_samples, args.seed, h, thr)
            val = pretext_samples(market, args.eval_split, args.env, args.pretrain_samples // 5, args.seed + 1, h, thr)
        if objective == "direction":  # only the labels whose horizon stays inside the split
            train, val = (({k: v[ok] for k, v in o.items()}, y[ok], ok) for o, y, ok, _ in (train, val))
            label = {"horizon": h, "threshold": thr}
        L, F = train[0]["technical"].shape[-2:]
        out_dim = L * F if objective == "masked" else 1
        torch.manual_seed(args.seed)
        head = nn.Linear(agent.encoder.output_dim, out_dim).to(device)
        params = list(fitted.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=1e-3)
        n = len(train[1])
        val_gen = torch.Generator().manual_seed(args.seed + 2)
        val_in, val_target, val_hide = pretext_batch(objective, val[0], val[1], val_gen)  # the same masks every epoch

        def to_dev(x):
            if isinstance(x, dict):
                return {k: v.to(device) for k, v in x.items()}
            return None if x is None else x.to(device)

        def score() -> float:
            fitted.eval()  # no dropout while scoring (the PPO scripts build it without)
            with torch.no_grad():
                losses = []
                for i in range(0, len(val[1]), 4096):
                    part = {k: v[i : i + 4096] for k, v in val_in.items()}
                    hid = None if val_hide is None else val_hide[i : i + 4096]
                    emb = embed(to_dev(part))
                    losses.append(pretext_loss(objective, head, emb, to_dev(val_target[i : i + 4096]), to_dev(hid)))
            fitted.train()
            return float(torch.stack(losses).mean())  # the mean over chunks of 4,096 samples

        # what a constant guess scores: predicting 0 for the standardised features, or the train split's base rate
        if objective == "direction":
            base = train[1].float().mean().clamp(1e-6, 1 - 1e-6)
            baseline = float(nn.functional.binary_cross_entropy(base.expand_as(val[1]), val[1]))
        elif objective == "next_return":
            baseline = float(val_target.square().mean())
        else:
            baseline = float(((val_target.square().mean(-1)) * val_hide).sum() / val_hide.sum())
        history = [score()]
        best = (history[0], copy.deepcopy(fitted.state_dict()))
        for _ in range(args.pretrain_epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n - batch + 1, batch):
                idx = order[i : i + batch]
                x, target, hide = pretext_batch(objective, {k: v[idx] for k, v in train[0].items()}, train[1][idx], gen)
                loss = pretext_loss(objective, head, embed(to_dev(x)), to_dev(target), to_dev(hide))
                opt.zero_grad()
                loss.backward()
                opt.step()
            history.append(score())
            if history[-1] < best[0]:
                best = (history[-1], copy.deepcopy(fitted.state_dict()))
        fitted.load_state_dict(best[1])  # the epoch that scores best on --eval-split (0: as initialised)
    return fitted, {
        "objective": objective, "split": args.split, "bars": list(market.splits[args.split]),
        "eval_split": args.eval_split, "samples": n, "eval_samples": len(val[1]), "epochs": args.pretrain_epochs,
        "label": label, "module": "encoder" if fitted is agent.encoder else "encoder and cross-symbol block",
        "val_loss_by_epoch": history, "val_loss": best[0], "best_epoch": history.index(best[0]),
        "val_baseline_loss": baseline,
    }  # fmt: skip


if __name__ == "__main__":
    xp.report_user_errors()  # bad input: one message naming the input and the fix, exit status 2, no traceback
    defaults = xp.resume_defaults(Args, sys.argv[1:])  # --resume: the run's own settings, unless a flag says otherwise
    args = tyro.cli(Args) if defaults is None else tyro.cli(Args, default=defaults)
    T = args.num_steps
    xp.check_run_args(args)  # the flags both scripts share, and the --data.* flags
    xp.require(not args.explain or args.eval_checkpoint, "--explain explains a saved agent: add --eval-checkpoint "
               "runs/<run>/best.pt (or checkpoint.pt), or leave --explain out to train")  # fmt: skip
    if args.walk_forward:  # K folds, each this script in a process of its own, then the stitched out-of-sample report
        xp.run_walk_forward(__file__, args, "agent")
        raise SystemExit(0)
    xp.require(args.pretrain == "none" or (args.pretrain_samples >= 1024 and args.pretrain_epochs >= 1),
               f"--pretrain-samples {args.pretrain_samples} --pretrain-epochs {args.pretrain_epochs}: pretraining "
               "needs at least 1024 samples (two minibatches of 512) and one epoch")  # fmt: skip
    shares = (*args.curriculum, 1.0)
    rising = all(0 < a <= b <= 1 for a, b in zip(shares, shares[1:], strict=False))
    xp.require(rising and 0 < args.curriculum_span <= 1, f"--curriculum {' '.join(map(str, args.curriculum))} "
               f"--curriculum-span {args.curriculum_span}: the shares must rise (or stay) within (0, 1], e.g. "
               "--curriculum 0.1 0.3 0.6, and the span lie in (0, 1]")  # fmt: skip
    xp.require(args.ent_guard_boost >= 1.0 and 0 < args.ent_guard_relax <= 1.0, "need --ent-guard-boost >= 1 and "
            "0 < --ent-guard-relax <= 1")  # fmt: skip
    args.world_size, rank, device = xp.init_distributed(args.cuda)

    market = xp.prepare_market_on_ranks(args.data, rank, args.world_size)
    S = args.num_symbols = len(market.data.symbols)
    E = xp.resolve_num_envs(args, S)  # 16 up to 10 symbols, fewer above
    args.batch_size = T * E * S
    args.minibatch_size = args.batch_size // args.num_minibatches
    xp.rollout_iterations(args, rank)  # whole rollouts; a total that is not is announced
    env_cfg = args.env

    # encoder: an MLP by default on CPU (--encoder-preset; the transformer is much slower there, docs/training.md)
    args.encoder, preset = xp.encoder_preset(args.encoder, args.encoder_preset, use_cuda=device.type == "cuda")

    # seeding (each rank its own seed and envs)
    xp.seed_everything(args.seed + rank, args.torch_threads, args.torch_deterministic)

    envs = VecTradingCore(market, E, split=args.split, mode="independent", config=env_cfg, seed=args.seed + rank)
    fingerprint = xp.market_fingerprint(market)  # stored with every checkpoint: what the weights were trained on
    saved = (
        xp.load_for_evaluation(args.eval_checkpoint, market, "ppo_symbol_agent.py", data=args.data)
        if args.eval_checkpoint
        else None
    )
    if saved:  # a saved agent keeps its own network
        args.encoder, args.shared_heads = saved["encoder"], saved["args"]["shared_heads"]
    xp.require(not args.explain or args.encoder.cross_symbol == "none", "--explain credits each decision to its own "
               "symbol's window, but this agent's --encoder.cross-symbol block reads every symbol's: leave --explain "
               "out")  # fmt: skip
    xp.require(args.graph_from_train == 0 or (args.encoder.cross_symbol == "attention"
                                               and args.encoder.cross_symbol_graph and args.graph_from_train > 0),
               f"--graph-from-train {args.graph_from_train} sets the graph of a cross-symbol block: add --encoder."
               "cross-symbol attention (with its graph on) and a positive scale, or leave it at 0")  # fmt: skip
    xp.require(args.aux_next_return >= 0, f"--aux-next-return {args.aux_next_return} is a loss weight: use 0 (off) "
               "or a positive value")  # fmt: skip
    args.encoder = set_input_shapes(args.encoder, envs.observation_shapes)
    agent = SymbolPolicy(S, args.encoder, shared_heads=args.shared_heads).to(device)
    with torch.no_grad():  # start from a policy that mostly holds: trading is the exception it has to earn
        agent.actor.biases[-1][:, 0] = args.hold_bias
        if args.graph_from_train > 0:  # the cross-symbol block's graph from the training bars' lead-lag correlations
            agent.cross.graph.copy_(args.graph_from_train * split_lagged_correlation(market, args.split))
    xp.broadcast_parameters(agent, args.world_size)  # identical initial weights on every rank
    # --aux-next-return: a read-out of the embedding, trained beside the policy; kept out of the agent's weights
    # (every checkpoint reader stays as it is) and saved in the run checkpoint for --resume
    aux_head = nn.Linear(args.encoder.output_dim, 1).to(device) if args.aux_next_return > 0 else None
    trained = list(agent.parameters()) + ([] if aux_head is None else list(aux_head.parameters()))
    if aux_head is not None:
        xp.broadcast_parameters(aux_head, args.world_size)
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5)
    ctl = {"bonus_mult": 1.0, "guard_mult": 1.0, "interventions": 0}
    global_step, start_iteration, best_val, best_state, val_sharpes = 0, 1, -np.inf, None, []
    val_steps = []  # the global step of each periodic evaluation (the learning benchmark's curve)
    next_obs_np = envs.reset(seed=args.seed + rank)
    run_dir = Path(args.run_dir) / f"{args.exp_name}__{xp.data_tag(args.data)}__{args.seed}__{int(time.time())}"

    if args.resume:
        resumed = xp.resume_run(
            args.resume, agent, optimizer, device, rank, args.world_size, market, args.num_iterations, args
        )
        global_step, extra, own, run_dir = resumed
        ctl, start_iteration, best_val = extra["entropy_control"], extra["iteration"] + 1, extra["best_val"]
        val_sharpes, val_steps = extra.get("val_sharpes", []), extra.get("val_steps", [])
        if aux_head is not None:
            xp.require("aux_head" in extra, f"{args.resume} was trained without --aux-next-return: resume it without")
            aux_head.load_state_dict(extra["aux_head"])
        if (run_dir / "best.pt").is_file():
            best_state = xp.load_checkpoint(run_dir / "best.pt")["model"]
        envs.set_state(own["core"])  # in place: next_obs_np is envs.obs
    elif saved:  # --eval-checkpoint: no training, straight to the final backtest
        agent.load_state_dict(saved["model"])
        global_step, start_iteration = saved["global_step"], args.num_iterations + 1
        run_dir = run_dir.with_name(run_dir.name + "__eval")

    writer, mlflow = None, None
    if rank == 0:
        writer, mlflow = xp.open_run(run_dir, args, global_step, market, device)
        net = f"{args.encoder.kind} (d_model {args.encoder.d_model}, output_dim {args.encoder.output_dim}) on {device}"
        if saved:  # evaluation: no training, so no rollout sizes
            print(f"run {run_dir} | evaluating {args.eval_checkpoint} ({S} symbols, step {global_step}) | {net}")
        else:
            print(
                f"run {run_dir} | {S} symbols x {E} envs x {T} steps x {args.world_size} rank(s) = "
                f"{args.batch_size * args.world_size} symbol-steps per iteration, {args.num_iterations} iterations | "
                f"encoder preset {preset}: {net}"
            )

    pretrained = xp.pretraining_record(run_dir) if args.resume else None  # a resumed run keeps its record
    if args.pretrain != "none" and not (args.resume or saved):  # the encoder's initialisation, before any rollout
        t_pre = time.time()
        fitted, pretrained = pretrain_encoder(args, agent, market, device)
        pretrained |= {"market": fingerprint, "seed": args.seed}
        xp.broadcast_parameters(agent, args.world_size)
        if rank == 0:
            pretrained["wall_s"] = time.time() - t_pre
            xp.record_pretraining(run_dir, writer, args, fitted, pretrained)

    # ALGO Logic: Storage setup. Observations (T, E, S, ...) in preallocated buffers, the action mask among them.
    obs = {
        k: torch.zeros((T, E, S) + tuple(shape), dtype=torch.int8 if k == "action_mask" else torch.float32)
        for k, shape in envs.observation_shapes.items()
    }
    obs = {k: v.to(device) for k, v in obs.items()}
    actions = torch.zeros((T, E, S), dtype=torch.long, device=device)
    logprobs, rewards, values, final_values = (torch.zeros((T, E, S), device=device) for _ in range(4))
    terminateds, truncateds = (torch.zeros((T, E, S), dtype=torch.bool, device=device) for _ in range(2))
    policy_actions, executed_actions = np.zeros((T, E, S), np.int8), np.zeros((T, E, S), np.int8)
    start_time, start_step = time.time(), global_step
    last_eval, last_telemetry, stop, stopping = {}, {}, xp.stop_on_sigint(), False

    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate
        ent_coef = scheduled_ent_coef(args, global_step) * ctl["bonus_mult"] * ctl["guard_mult"]
        kl_coef = scheduled_kl_prior_coef(args, global_step)

        t_rollout = time.time()
        tele, episodes, policy_entropy = {}, {}, 0.0
        tradable = curriculum_tradable(args, global_step, S)  # None: every symbol trades
        held_out = None if tradable is None else torch.as_tensor(~tradable, device=device)
        for step in range(T):
            global_step += E * S * args.world_size
            for k, v in obs.items():
                v[step].copy_(torch.as_tensor(next_obs_np[k]))
            if held_out is not None:  # symbols not yet onboarded: HOLD only (the mask stored is the one sampled)
                obs["action_mask"][step][:, held_out, 1:] = 0
            step_obs = {k: v[step] for k, v in obs.items()}
            with torch.no_grad():
                logits, value = agent(step_obs)
                action, logprob, entropy, choice = masked_policy(logits)
            actions[step], logprobs[step], values[step] = action, logprob, value
            policy_entropy += choice_mean(entropy, choice).item() / T

            next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            rewards[step] = torch.as_tensor(reward, device=device)
            terminateds[step] = torch.as_tensor(terminated, device=device)
            truncateds[step] = torch.as_tensor(truncated, device=device)
            bootstrap = truncated & ~terminated  # (E, S): value of the ended episode's last observation
            final_values[step] = 0.0
            if bootstrap.any():  # only the envs that were truncated go through the network
                rows = bootstrap.any(1)
                with torch.no_grad():
                    v_final = agent.get_value(to_torch({k: a[rows] for k, a in info["final_obs"].items()}, device))
                final_values[step][torch.as_tensor(rows, device=device)] = v_final

            # telemetry: per-step means, summed over the rollout
            policy_actions[step], executed_actions[step] = info["policy_action"], info["executed_action"]
            add_step_telemetry(tele, episodes, info, T)
        rollout_seconds = time.time() - t_rollout

        # ALGO LOGIC: advantages with bootstrap at truncation
        t_update = time.time()
        with torch.no_grad():
            next_obs_t = to_torch(next_obs_np, device)
            next_value = agent.get_value(next_obs_t)
            advantages, returns = compute_gae(
                rewards, values, terminateds, truncateds, final_values, next_value, args.gamma, args.gae_lambda
            )

        # flatten (T, E) -> T*E env-steps; the symbol axis stays so that the per-symbol heads run batched
        b_obs = {k: v.reshape((T * E,) + v.shape[2:]) for k, v in obs.items()}
        b_logprobs, b_actions = logprobs.reshape(T * E, S), actions.reshape(T * E, S)
        b_advantages, b_returns, b_values = (x.reshape(T * E, S) for x in (advantages, returns, values))
        b_prior = None
        if kl_coef > 0:  # (T*E, S, 7) prior log-probabilities under the rollout's masks
            b_prior = sl_prior_logprobs(b_obs["sl_probs"], b_obs["action_mask"], args.kl_prior_temperature)

        b_aux = None
        if aux_head is not None:  # (T*E, S) targets and validity: the bar after each decision, same episode
            aux_y, aux_ok = next_return_targets(obs["technical"], next_obs_t["technical"], terminateds | truncateds)
            b_aux = (aux_y.reshape(T * E, S), aux_ok.reshape(T * E, S))
        aux_loss = torch.zeros((), device=device)

        b_inds = np.arange(T * E)
        mb_rows = (T * E) // args.num_minibatches
        clipfracs = []
        for _epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, T * E, mb_rows):
                mb_inds = torch.as_tensor(b_inds[start : start + mb_rows], device=device)
                mb_obs = {k: v[mb_inds] for k, v in b_obs.items()}
                z = agent.embed(mb_obs)  # one encoder pass for the heads and, with --aux-next-return, the read-out
                logits, newvalue = agent.heads(mb_obs, z)  # (mb, S, 7) logits masked by the rollout's mask, (mb, S)
                if b_aux is not None:
                    ok = b_aux[1][mb_inds]
                    aux_loss = ((aux_head(z).squeeze(-1) - b_aux[0][mb_inds])[ok] ** 2).mean()
                _, newlogprob, entropy, choice = masked_policy(logits, b_actions[mb_inds])
                pg_loss, v_loss, old_approx_kl, approx_kl, clipfrac = ppo_loss(
                    newlogprob, b_logprobs[mb_inds], b_advantages[mb_inds], newvalue, b_values[mb_inds],
                    b_returns[mb_inds], args.clip_coef, args.clip_vloss, args.norm_adv,
                )  # fmt: skip
                clipfracs.append(clipfrac)

                # supervised prior: E_pi[-log q], the cross-entropy of the policy against the prior. It is
                # KL(pi || q) without pi's own entropy, so a flat prior (no signal) exerts no pull: the KL against a
                # uniform prior would be a hidden entropy bonus on top of ent_coef.
                prior_ce = torch.zeros((), device=device)
                if b_prior is not None:
                    prior_ce = -(torch.softmax(logits, -1) * b_prior[mb_inds]).sum(-1).mean()

                entropy_loss = choice_mean(entropy, choice)  # normalised entropy (1 = uniform over allowed actions)
                loss = pg_loss - ent_coef * entropy_loss + v_loss * args.vf_coef + kl_coef * prior_ce
                loss = loss + args.aux_next_return * aux_loss

                optimizer.zero_grad()
                loss.backward()
                if args.world_size > 1:
                    xp.allreduce_grads(agent, args.world_size)
                    if aux_head is not None:
                        xp.allreduce_grads(aux_head, args.world_size)
                nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and xp.mean_over_ranks(approx_kl, args.world_size) > args.target_kl:
                break

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        update_seconds = time.time() - t_update

        # entropy control from this rollout, then logging (rank 0)
        telemetry = telemetry_metrics(tele, policy_actions, executed_actions, obs["action_mask"].cpu().numpy())
        action_entropy = telemetry["charts/policy_action_entropy_mean"]
        intervened = update_entropy_control(args, ctl, global_step, policy_entropy, action_entropy)

        stopping = xp.all_ranks_stop(stop, args.world_size)

        # periodic evaluation on eval_split (rank 0), before the checkpoint so that the checkpoint holds its result
        evaluation = {}
        periodic = iteration % max(args.eval_interval, 1) == 0 or iteration == args.num_iterations
        if rank == 0 and args.eval_interval and periodic:
            t_eval = time.time()
            agent.eval()
            report = run_backtest(agent_policy(agent, device), market, args.eval_split, env_cfg, seed=args.seed)
            agent.train()
            last_eval = {k: v for k, v in report["agent"].items() if v is not None}
            evaluation = {f"trading/{args.eval_split}_{k}": v for k, v in last_eval.items()}
            evaluation["perf/eval_seconds"] = time.time() - t_eval
            val_sharpes.append(last_eval["sharpe"])  # every sweep is a candidate of the selection: the DSR's trials
            val_steps.append(global_step)
            if last_eval["sharpe"] > best_val:  # the best-on-validation weights, kept beside the last ones
                best_val, best_state = last_eval["sharpe"], copy.deepcopy(agent.state_dict())
                if args.save_model:
                    extra = {"market": fingerprint, "iteration": iteration, "val": last_eval}
                    xp.save_checkpoint(run_dir / "best.pt", agent, args=args, global_step=global_step, extra=extra)

        # checkpoint: every rank's envs (next observation included) and RNG, gathered on rank 0
        if args.save_model and (periodic or stopping):
            extra = {"iteration": iteration, "entropy_control": ctl, "market": fingerprint, "best_val": best_val,
                     "val_sharpes": val_sharpes, "val_steps": val_steps}  # fmt: skip
            if aux_head is not None:
                extra["aux_head"] = aux_head
            xp.save_run_checkpoint(
                run_dir, agent, optimizer, args, global_step, {"core": envs.get_state()}, extra, rank
            )
        if rank != 0:
            if stopping:
                break
            continue
        if intervened:
            print(
                f"global_step={global_step} entropy guard: policy_action_entropy_mean {action_entropy:.3f} < "
                f"{args.ent_guard_threshold}, guard multiplier -> {ctl['guard_mult']:.2f} "
                f"(intervention {ctl['interventions']})"
            )
        # unique executed actions per ended episode, or per slot over this rollout when none ended
        unique = episodes.get("unique_actions") or (executed_actions[..., None] == np.arange(7)).any(0).sum(-1)
        metrics = telemetry | {
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/ent_coef": ent_coef,
            "charts/kl_prior_coef": kl_coef,
            "charts/entropy_bonus_multiplier": ctl["bonus_mult"],
            "charts/entropy_guard_multiplier": ctl["guard_mult"],
            "charts/entropy_guard_interventions": ctl["interventions"],
            "charts/policy_entropy": policy_entropy,
            "charts/ep_unique_actions": float(np.mean(unique)),
            "charts/curriculum_tradable_share": 1.0 if tradable is None else float(tradable.mean()),
            "losses/value_loss": v_loss.item(),
            "losses/policy_loss": pg_loss.item(),
            "losses/entropy": entropy_loss.item(),
            "losses/old_approx_kl": old_approx_kl.item(),
            "losses/approx_kl": approx_kl.item(),
            "losses/clipfrac": float(np.mean(clipfracs)),
            "losses/explained_variance": float(explained_var),
            "losses/prior_cross_entropy": prior_ce.item(),
            "losses/aux_next_return": aux_loss.item(),
            "reward/total": rewards.mean().item(),
            "perf/rollout_seconds": rollout_seconds,
            "perf/update_seconds": update_seconds,
        }
        if episodes:
            metrics["charts/episodic_return"] = float(np.mean(episodes["reward"]))  # sum of rewards
            metrics["charts/episodic_length"] = float(np.mean(episodes["length"]))
            metrics.update({f"trading/episode_{k}": float(np.mean(v)) for k, v in episodes.items()})
        metrics.update(evaluation)
        sps = int((global_step - start_step) / (time.time() - start_time))
        eta = (time.time() - start_time) / (iteration - start_iteration + 1) * (args.num_iterations - iteration)
        metrics["charts/SPS"] = sps
        xp.log_scalars(writer, mlflow, metrics, global_step)
        val_sharpe = metrics.get(f"trading/{args.eval_split}_sharpe")
        print(
            f"iter {iteration}/{args.num_iterations} ETA {eta / 60:.1f} min global_step={global_step} SPS={sps} "
            f"ent_coef={ent_coef:.4f} policy_action_entropy={action_entropy:.3f} reward={metrics['reward/total']:.4f}"
            + (f" {args.eval_split}_sharpe={val_sharpe:.2f}" if val_sharpe is not None else "")
        )
        last_telemetry = xp.summary_telemetry(metrics)
        if stopping:
            break

    if stopping:  # interrupted: no backtest, the folder stays marked incomplete, exit status 130
        xp.exit_interrupted(writer, run_dir, global_step, args.save_model, rank, args.world_size)
    xp.stop_at_once_on_sigint()

    # final backtest on the test split: the agent (argmax and sampled) beside every baseline and the rule ceiling
    if rank == 0:
        t_eval = time.time()
        tested = copy.deepcopy(agent).eval()  # the trained weights stay as they are (torchrun checks them below)
        selected = args.final_weights == "best_val" and best_state is not None
        if selected:  # model selection on the validation split
            tested.load_state_dict(best_state)
        make_policy = lambda sample_seed, record: agent_policy(tested, device, sample_seed, record)  # noqa: E731
        trials = val_sharpes if selected else []  # the last weights were not picked among candidates
        tests = agent_final_report(make_policy, market, args, env_cfg, run_dir, writer, envs.symbols, trials)
        reports, figures, title = tests["reports"], tests["figures"], tests["title"]
        if args.explain:  # saliency and the SL vs RL decision report (docs/explain.md)
            explained = explain_decisions(tested.get_logits, market, args.test_split, env_cfg, args.seed, device)
            print(save_explanation(run_dir, explained))
            figures["saliency"] = saliency_figure(explained, title)
        xp.finish_run(run_dir, writer, mlflow, args, figures, reports["agent"], global_step, t_eval, seed=args.seed,
                   encoder=args.encoder.kind, backtest=reports, rule=tests["rule"], cross_rule=tests["cross_rule"],
                   deciles=tests["deciles"], val=last_eval, telemetry=last_telemetry, entropy_control=ctl,
                   final_weights="best_val" if selected else "last",
                   best_val_sharpe=best_val if selected else None, val_sharpes=val_sharpes, val_steps=val_steps,
                   stress=tests["stress"], pretrain=pretrained)  # fmt: skip
    if args.world_size > 1:  # every rank must end with rank 0's weights (same init, same all-reduced gradients)
        xp.assert_ranks_agree(agent.parameters(), rank)
    xp.leave_distributed(args.world_size)
