"""The cross-symbol block (--encoder.cross-symbol attention) against none: what it costs and what each part of it is
for, measured in one run on one torch thread.

    python benchmarks/bench_cross_symbol.py --json benchmarks/results/cross_symbol.json    # ~4 min on one core

- train: charts/SPS (symbol-steps per second, rollout and update) of ppo_symbol_agent.py with the CPU preset's MLP
  encoder (d_model 128, output_dim 128), --shared-heads, 10 symbols x 16 envs x 64 steps, 2 iterations, periodic
  evaluation off; the median of --repeats runs, none and attention interleaved so a busy spell hits both.
- forward: the latency of SymbolPolicy's forward (inference mode, eval) at 143 symbols for 1 and 16 envs, and of
  one forward+backward of a PPO-style loss at 16 envs; p50 over repeats, none and attention back to back.
- probe: why the block reads what it reads. A supervised stand-in for the lead-lag market (--data.lead-lag 0.45
  --data.signal-strength 0, 10 symbols): regress every symbol's next ret_1 on the observation window of its bar
  (Adam, batches of 64 bars from the train split) and report the followers' R^2 on the validation split along the
  way; the ceiling is ~0.09 (the leader's last return predicts a follower's next with correlation ~0.30). Variants:
  none; attention; attention without its learned graph, without the lagged-correlation term (beta held at 0), and
  without the newest bar in q, k, v (those weight columns held at 0). Also the share of (follower, bar) whose
  window's lagged correlation ranks the leader first among the other symbols: the graph a 24-bar window gives.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import MLP, run_ours
from common import summarize, write_json  # also puts the repo root on sys.path

from encoders import RET_1, EncoderConfig, SymbolPolicy, lagged_correlation, random_observation
from market_data import DataConfig, lead_lag_leaders, prepare_market

VARIANTS = ["none", "attention", "no_graph", "no_lag_correlation", "no_newest_bar"]


def train_speed(repeats: int, num_symbols: int) -> dict:
    data_flags = ["--data.num-symbols", str(num_symbols), "--data.no-sl-signals", "--data.years", "2"]
    runs: dict[str, list[float]] = {"none": [], "attention": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for cross in runs:
                enc = {**MLP, "cross_symbol": cross}
                runs[cross].append(run_ours(enc, data_flags, 16, 64, 2, Path(tmp)))
                print(f"train {cross}: {runs[cross][-1]:.0f} SPS", flush=True)
    out = {k: {"sps": statistics.median(v), "sps_runs": v} for k, v in runs.items()}
    out["ratio"] = out["attention"]["sps"] / out["none"]["sps"]
    return {"encoder": MLP, "num_symbols": num_symbols, "num_envs": 16, "num_steps": 64, "iterations": 2, **out}


def forward_speed(num_symbols: int, repeats: int) -> dict:
    """p50 ms of forward (1 and 16 envs) and of forward+backward (16 envs), none and attention interleaved."""
    policies = {}
    for cross in ("none", "attention"):
        torch.manual_seed(0)
        cfg = EncoderConfig(**MLP, dropout=0.0, cross_symbol=cross)
        policies[cross] = SymbolPolicy(num_symbols, cfg, shared_heads=True).eval()
    cases = {}
    for envs in (1, 16):
        obs = random_observation(envs, num_symbols, mask="all")
        cases[f"forward_{envs}_envs"] = (obs, False)
    cases["forward_backward_16_envs"] = (random_observation(16, num_symbols, mask="all"), True)
    times = {(case, cross): [] for case in cases for cross in policies}
    for _ in range(repeats):
        for case, (obs, backward) in cases.items():
            for cross, policy in policies.items():
                t0 = time.perf_counter()
                if backward:
                    logits, value = policy(obs)
                    (torch.log_softmax(logits, -1)[..., 0].mean() + value.pow(2).mean()).backward()
                    policy.zero_grad(set_to_none=True)
                else:
                    with torch.inference_mode():
                        policy(obs)
                times[case, cross].append(time.perf_counter() - t0)
    out = {"num_symbols": num_symbols, "repeats": repeats}
    for case in cases:
        row = {cross: 1e3 * summarize(times[case, cross][1:])["median_s"] for cross in policies}  # first: warm-up
        row["ratio"] = row["attention"] / row["none"]
        out[case] = row
        print(f"{case}: none {row['none']:.2f} ms, attention {row['attention']:.2f} ms", flush=True)
    return out


def probe(steps: int, seeds: list[int], evals: int = 8) -> dict:
    S, L = 10, 24
    market = prepare_market(
        DataConfig(num_symbols=S, signal_strength=0.0, lead_lag=0.45, sl_signals=False, cache=False)
    )
    tech = torch.as_tensor(market.technical)  # (T, S, F)
    (lo, hi), (vlo, vhi) = market.splits["train"], market.splits["val"]
    leaders = torch.as_tensor(lead_lag_leaders(S))
    followers = leaders != torch.arange(S)

    def windows(bars) -> tuple[dict, torch.Tensor]:
        """Observations of these bars (the window ending at each, the state parts flat) and the next ret_1 (B, S)."""
        bars = torch.as_tensor(bars)
        window = torch.stack([tech[bars - L + 1 + k] for k in range(L)], dim=2)  # (B, S, L, F)
        flat = {k: torch.zeros(len(bars), S, n) for k, n in (("position", 5), ("portfolio", 8), ("regime", 10))}
        return {"technical": window, "sl_probs": torch.full((len(bars), S, 3), 0.5), **flat}, tech[bars + 1, :, RET_1]

    val_obs, val_y = windows(np.arange(vlo + L, vhi - 1))
    z = lagged_correlation(val_obs["technical"][..., RET_1])  # (B, S, S)
    z = z.masked_fill(torch.eye(S, dtype=torch.bool), -torch.inf)
    hit_rate = (z.argmax(-1) == leaders)[:, followers].float().mean().item()
    print(f"the window's lagged correlation ranks the leader first for {hit_rate:.0%} of (follower, bar)", flush=True)

    def build(variant: str) -> SymbolPolicy:
        cross = "none" if variant == "none" else "attention"
        cfg = EncoderConfig(kind="mlp", d_model=32, output_dim=32, dropout=0.0, cross_symbol=cross,
                            cross_symbol_graph=variant != "no_graph")  # fmt: skip
        policy = SymbolPolicy(S, cfg, shared_heads=True, hidden=(32,))
        if variant == "no_lag_correlation":
            policy.cross.lag_weight.requires_grad_(False)  # beta stays at its initial 0
        if variant == "no_newest_bar":
            w = policy.cross.qkv.weight  # (3D, D + F): the last F columns read the newest bar
            keep = torch.ones_like(w)
            keep[:, -tech.shape[-1] :] = 0
            with torch.no_grad():
                w.mul_(keep)
            w.register_hook(lambda grad: grad * keep)  # Adam moves no weight whose gradient is always 0
        return policy

    curves = {v: [] for v in VARIANTS}
    for seed in seeds:
        for variant in VARIANTS:
            torch.manual_seed(seed)
            policy = build(variant)
            opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
            rng, curve = np.random.default_rng(seed), []
            for step in range(1, steps + 1):
                obs, y = windows(rng.integers(lo + L, hi - 1, 64))
                loss = ((policy.get_value(obs) - y) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % (steps // evals) == 0:
                    with torch.no_grad():
                        err = (policy.get_value(val_obs) - val_y)[:, followers]
                    curve.append(1.0 - (err**2).mean().item() / val_y[:, followers].var().item())
            curves[variant].append(curve)
            print(f"probe seed {seed} {variant}: R^2 {' '.join(f'{r:.3f}' for r in curve)}", flush=True)
    every = steps // evals
    return {
        "market": "lead-lag 0.45, signal-strength 0, 10 symbols, 10 years, seed 0",
        "network": "MLP encoder d_model 32, output_dim 32, shared heads (32), 4 cross-symbol heads",
        "steps": steps,
        "batch_bars": 64,
        "lr": 1e-3,
        "seeds": seeds,
        "eval_steps": [every * (i + 1) for i in range(evals)],
        "follower_val_r2": curves,
        "follower_val_r2_mean": {v: np.mean(c, axis=0).round(4).tolist() for v, c in curves.items()},
        "window_leader_hit_rate": hit_rate,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the record here (e.g. benchmarks/results/cross_symbol.json)")
    p.add_argument("--repeats", type=int, default=3, help="training runs per variant (interleaved); medians")
    p.add_argument("--forward-repeats", type=int, default=30, help="timed calls per forward case and variant")
    p.add_argument("--probe-steps", type=int, default=1600, help="Adam steps per probe run")
    p.add_argument("--probe-seeds", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    record = {
        "torch_threads": 1,
        "train": train_speed(args.repeats, 10),
        "forward": forward_speed(143, args.forward_repeats),
    }
    record["probe"] = probe(args.probe_steps, args.probe_seeds)
    record["seconds"] = time.perf_counter() - t0
    write_json(args.json, record)
