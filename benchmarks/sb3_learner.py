"""Stable-Baselines3 peers of ppo_symbol_agent.py on the same learning work, for benchmarks/bench_learning.py's arms:
SB3's PPO or sb3-contrib's MaskablePPO trained on trading_env.SB3VecEnv (every (env, symbol) slot of one
VecTradingCore is one SB3 env, the core ppo_symbol_agent.py trains on), on the market, environment, splits, seed and
symbol-step budget that ppo_symbol_agent.py's own flags give, its weights picked on the validation split as that
script picks them, then graded by the same final backtest (backtest.agent_backtests: the agent argmax and sampled,
every baseline, the rule ceiling; the stress tests) into a run folder of the same form (summary.json, backtest.json
and .md, <split>_daily_returns.parquet, the figures, tensorboard).

    python benchmarks/sb3_learner.py --algo maskable_ppo --hparams ours --data.signal-strength 0.3 --seed 1
    python benchmarks/sb3_learner.py --algo ppo --hparams default --total-timesteps 400000

Every flag after --algo and --hparams is one of ppo_symbol_agent.py's (its `Args`). What each one means here:

- market, environment, splits, seed, threads, device (--data.*, --env.*, --seed, --split, --eval-split,
  --test-split, --torch-threads, --cuda), the budget (--total-timesteps, in symbol-steps, rounded down to whole
  rollouts as ppo_symbol_agent.py rounds it), --num-envs (envs of the core; SB3 sees num_envs x symbols envs),
  --eval-interval and --final-weights (validation sweeps every eval_interval x num_steps x num_envs x symbols
  symbol-steps, at the end of an update, and at the end; the best weights are graded), --eval-samples, --stress;
- --hparams ours, every knob SB3 has too: learning_rate (linearly annealed to 0 with --anneal-lr), num_steps
  (n_steps per env), num_minibatches (batch_size = rollout / num_minibatches), update_epochs, gamma, gae_lambda,
  clip_coef (clip_range, and clip_range_vf with --clip-vloss), norm_adv, ent_coef, vf_coef, max_grad_norm,
  target_kl; and the network: the encoder of --encoder.* after --encoder-preset as SB3's features extractor (shared
  by actor and critic, as SymbolPolicy shares it), ReLU heads of SymbolPolicy's widths;
- --hparams default: SB3's own defaults for all of those (n_steps 2048, batch 64, 10 epochs, gamma 0.99, GAE 0.95,
  no entropy bonus, MultiInputPolicy: the observation flattened into a 64-64 tanh MLP);
- not read (SB3 has no such knob): the entropy schedule, bonus and guard, entropy normalised by the allowed actions,
  the supervised prior, hold_bias, shared_heads; nor --resume, --eval-checkpoint, --walk-forward, --save-model,
  --track (refused).

PPO (unmasked) submits whatever it picks; the environment executes a masked action as HOLD and counts it
(docs/environment.md). summary.json's "sb3" records the algorithm, the keyword arguments it ran with and, on the test
split, the share of the argmax policy's decisions that the mask refused.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import tyro
from common import ROOT  # noqa: F401  (puts the repo root on sys.path)
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

import experiment as xp
from backtest import (
    agent_final_report,
    run_backtest,
)
from encoders import EncoderConfig, SymbolPolicy, make_encoder, set_input_shapes
from ppo_symbol_agent import Args
from trading_env import INCREASE_ACTIONS, SB3VecEnv

ALGOS = ("maskable_ppo", "ppo")
HPARAMS = ("default", "ours")
REFUSED = ("resume", "eval_checkpoint", "walk_forward", "save_model", "track")  # ppo_symbol_agent.py's, not here


def sb3_policy(model, masked: bool, sample_seed: int | None = None, record: list | None = None, tally=None):
    """The SB3 model as a policy for run_backtest: obs (E, S, ...) -> actions (E, S), argmax through model.predict
    (MaskablePPO gets the action masks), or sampled from the policy's distribution with a generator of its own
    (sample_seed). With `record`, each call appends (ret_1, P(increase exposure), increase allowed), each (S,), as
    ppo_symbol_agent.agent_policy does; with `tally` (a dict), it counts the decisions and those the mask refuses."""
    rng = None if sample_seed is None else np.random.default_rng(sample_seed)

    def act(obs):
        lead = obs["action_mask"].shape[:-1]  # (E, S)
        flat = {k: v.reshape(-1, *v.shape[len(lead) :]) for k, v in obs.items()}  # one SB3 env per slot
        mask = flat["action_mask"].astype(bool)  # (E * S, 7)
        kw = {"action_masks": mask} if masked else {}
        if rng is None:
            action, _ = model.predict(flat, deterministic=True, **kw)
        if rng is not None or record is not None:
            model.policy.set_training_mode(False)
            with torch.no_grad():
                dist = model.policy.get_distribution(model.policy.obs_to_tensor(flat)[0], **kw)
            p = dist.distribution.probs.double().cpu().numpy()  # (E * S, 7), 0 where masked (MaskablePPO)
            if record is not None:
                record.append((obs["technical"][0, :, -1, 0].copy(), p[:, INCREASE_ACTIONS].sum(-1),
                               mask[:, INCREASE_ACTIONS].any(-1)))  # fmt: skip
            if rng is not None:  # inverse CDF, u < total: an action of probability 0 is never drawn
                cdf = p.cumsum(-1)
                action = (cdf <= rng.random((len(p), 1)) * cdf[:, -1:]).sum(-1)
        action = np.asarray(action, dtype=np.int64)
        if tally is not None:
            tally["decisions"] += action.size
            tally["refused"] += int((~mask[np.arange(len(action)), action]).sum())
        return action.reshape(lead)

    return act


class EncoderExtractor(BaseFeaturesExtractor):
    """ppo_symbol_agent.py's encoder as SB3's features extractor: obs dict (B, ...) -> (B, output_dim); the action
    mask is not an input of the encoder."""

    def __init__(self, observation_space, config: EncoderConfig):
        super().__init__(observation_space, features_dim=config.output_dim)
        self.encoder = make_encoder(config)

    def forward(self, obs):
        return self.encoder(obs)


def sb3_kwargs(args: Args, hparams: str, num_symbols: int, encoder: EncoderConfig) -> tuple[dict, dict]:
    """PPO / MaskablePPO keyword arguments: {} (SB3's defaults) or ours, read from args; and their record (JSON)."""
    if hparams == "default":
        return {}, {"hparams": "default (SB3's own)"}
    lr, n = args.learning_rate, args.num_iterations
    hidden = list(inspect.signature(SymbolPolicy).parameters["hidden"].default)  # SymbolPolicy's head widths
    kw = {
        # SB3 reads the schedule after each rollout (remaining = 1 - i / n after rollout i); ours before it
        "learning_rate": (lambda remaining: min(remaining + 1 / n, 1.0) * lr) if args.anneal_lr else lr,
        "n_steps": args.num_steps,
        "batch_size": args.num_steps * args.num_envs * num_symbols // args.num_minibatches,
        "n_epochs": args.update_epochs,
        "gamma": args.gamma,
        "gae_lambda": args.gae_lambda,
        "clip_range": args.clip_coef,
        "clip_range_vf": args.clip_coef if args.clip_vloss else None,
        "normalize_advantage": args.norm_adv,
        "ent_coef": args.ent_coef,
        "vf_coef": args.vf_coef,
        "max_grad_norm": args.max_grad_norm,
        "target_kl": args.target_kl,
        "policy_kwargs": {
            "features_extractor_class": EncoderExtractor,
            "features_extractor_kwargs": {"config": encoder},
            "net_arch": {"pi": hidden, "vf": hidden},
            "activation_fn": nn.ReLU,
        },
    }
    record = {k: v for k, v in kw.items() if k not in ("learning_rate", "policy_kwargs")}
    record |= {"hparams": "ours", "learning_rate": f"{lr:g}" + (" annealed linearly to 0" if args.anneal_lr else "")}
    record["network"] = {"encoder": {k: getattr(encoder, k) for k in ("kind", "d_model", "output_dim")},
                         "net_arch": hidden, "activation": "relu"}  # fmt: skip
    return kw, record


class ValidationSelection(BaseCallback):
    """After every update that crosses a multiple of `every` symbol-steps, and at the end of training,
    evaluate(model) -> metrics on the validation split; keeps every Sharpe (the DSR's trials), the best weights and
    the last metrics: ppo_symbol_agent.py's periodic evaluation and best_val weights."""

    def __init__(self, evaluate, every: int):
        super().__init__()
        self.evaluate, self.every = evaluate, every
        self.next, self.sharpes, self.best, self.best_state, self.last = every, [], -np.inf, None, {}

    def _check(self) -> None:
        self.last = {k: v for k, v in self.evaluate(self.model).items() if v is not None}
        self.sharpes.append(self.last["sharpe"])
        print(f"global_step={self.num_timesteps} val_sharpe={self.last['sharpe']:.2f}", flush=True)
        if self.last["sharpe"] > self.best:
            self.best, self.best_state = self.last["sharpe"], copy.deepcopy(self.model.policy.state_dict())

    def _on_rollout_start(self) -> None:  # the previous rollout's update is done
        if self.num_timesteps >= self.next:
            self._check()
            while self.next <= self.num_timesteps:
                self.next += self.every

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self._check()


def main() -> None:
    xp.report_user_errors()  # bad input: one message naming the input and the fix, exit status 2, no traceback
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--algo", choices=ALGOS, required=True, help="maskable_ppo (sb3-contrib) or ppo (SB3, unmasked)")
    p.add_argument("--hparams", choices=HPARAMS, required=True, help="SB3's defaults or ppo_symbol_agent.py's values")
    known, rest = p.parse_known_args()
    args = tyro.cli(Args, args=rest, prog="sb3_learner.py --algo ALGO --hparams HPARAMS")
    xp.check_run_args(args)
    for name in REFUSED:
        xp.require(not getattr(args, name), f"--{name.replace('_', '-')} is a flag of ppo_symbol_agent.py that "
                   "benchmarks/sb3_learner.py does not have (it trains one run from scratch, keeps no checkpoint and "
                   "logs to no MLflow): leave it out")  # fmt: skip
    masked = known.algo == "maskable_ppo"
    use_cuda = args.cuda and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")

    market = xp.prepare_market_on_ranks(args.data, 0, 1)
    S = args.num_symbols = len(market.data.symbols)
    xp.resolve_num_envs(args, S)  # as ppo_symbol_agent.py resolves it
    env_cfg = args.env
    xp.seed_everything(args.seed, args.torch_threads, args.torch_deterministic)
    venv = SB3VecEnv(market, num_envs=args.num_envs, split=args.split, config=env_cfg, seed=args.seed)
    args.encoder, preset = xp.encoder_preset(args.encoder, args.encoder_preset, use_cuda=use_cuda)
    args.encoder = set_input_shapes(args.encoder, venv.core.observation_shapes)

    # the budget in whole rollouts, as ppo_symbol_agent.py counts it (symbol-steps)
    algo = MaskablePPO if masked else PPO
    n_steps = args.num_steps if known.hparams == "ours" else inspect.signature(algo).parameters["n_steps"].default
    args.batch_size = n_steps * venv.num_envs  # symbol-steps per rollout
    xp.rollout_iterations(args, 0)
    total = args.num_iterations * args.batch_size
    kw, hp_record = sb3_kwargs(args, known.hparams, S, args.encoder)

    model = algo("MultiInputPolicy", venv, seed=args.seed, device=device, verbose=0, **kw)
    evaluate = lambda m: run_backtest(sb3_policy(m, masked), market, args.eval_split, env_cfg, seed=args.seed)["agent"]  # noqa: E731
    every = max(args.eval_interval, 1) * args.num_steps * args.num_envs * S  # ppo_symbol_agent.py's cadence
    selection = ValidationSelection(evaluate, every) if args.eval_interval else None
    tag = f"sb3_{known.algo}_{known.hparams}"
    run_dir = Path(args.run_dir) / f"{args.exp_name}__{tag}__{xp.data_tag(args.data)}__{args.seed}__{int(time.time())}"
    writer, mlflow = xp.open_run(run_dir, args, 0, market, device)
    print(f"run {run_dir} | {tag}: {S} symbols x {args.num_envs} envs = {venv.num_envs} SB3 envs x {n_steps} "
          f"steps = {args.batch_size} symbol-steps a rollout, {args.num_iterations} rollouts", flush=True)  # fmt: skip
    t_train = time.time()
    model.learn(total_timesteps=total, callback=selection)
    train_seconds = time.time() - t_train
    telemetry = {k: float(v) for k, v in model.logger.name_to_value.items()}  # SB3's last update (train/*)
    telemetry["SPS"] = model.num_timesteps / train_seconds

    # final backtest on the test split, as ppo_symbol_agent.py's: argmax and sampled, baselines, rule ceiling
    t_eval = time.time()
    selected = args.final_weights == "best_val" and selection is not None and selection.best_state is not None
    if selected:  # model selection on the validation split
        model.policy.load_state_dict(selection.best_state)
    tally = {"decisions": 0, "refused": 0}
    # the tally counts the argmax backtest's decisions (record given), not the sampled runs' or the stress tests'
    make_policy = lambda seed, record: sb3_policy(model, masked, seed, record, None if record is None else tally)  # noqa: E731
    val_sharpes = selection.sharpes if selection is not None else []
    tests = agent_final_report(make_policy, market, args, env_cfg, run_dir, writer, venv.core.symbols,
                               val_sharpes if selected else [])  # fmt: skip
    refused = tally["refused"] / max(tally["decisions"], 1)
    sb3 = {"algo": known.algo, "masked": masked, "kwargs": hp_record, "encoder_preset": preset,
           "test_refused_action_rate": refused, "train_seconds": train_seconds}  # fmt: skip
    reports = tests["reports"]
    xp.finish_run(run_dir, writer, mlflow, args, tests["figures"], reports["agent"], model.num_timesteps, t_eval,
                  seed=args.seed, encoder=args.encoder.kind if known.hparams == "ours" else "sb3_flatten_mlp",
                  backtest=reports, rule=tests["rule"], cross_rule=tests["cross_rule"], deciles=tests["deciles"],
                  val=selection.last if selection else {},
                  telemetry=telemetry, final_weights="best_val" if selected else "last",
                  best_val_sharpe=selection.best if selected else None, val_sharpes=val_sharpes, stress=tests["stress"],
                  sb3=sb3)  # fmt: skip


if __name__ == "__main__":
    main()
