"""Training throughput, algorithm against algorithm on the same fast environment: ppo_symbol_agent.py against
Stable-Baselines3 PPO and sb3-contrib MaskablePPO, all three with the same encoder (encoders.make_encoder as SB3's
features extractor, the same 256-128 heads), on the same vectorised core (SB3 gets trading_env.SB3VecEnv, every
(env, symbol) slot of one VecTradingCore as one SB3 env, not one gymnasium env per slot), the same rollout
(num_steps x slots), minibatches and epochs, measured in one run.

    python benchmarks/bench_train.py --json benchmarks/results/train.json

SPS = symbol-steps (environment transitions) per second of training, rollout and update included: for this script
the last `charts/SPS` of a run with periodic evaluation off (data preparation and the final backtest excluded), for
SB3 the timesteps of `model.learn()` divided by its wall time; the median of --repeats interleaved runs per
framework. Torch runs one intra-op thread in every case (stated in the JSON). The seed's transformer (d_model 256,
4 layers) is far too slow for CPU training (~94 samples/s forward+backward on one core), so the transformer rows
use a small transformer on CPU and the seed's on CUDA; the LSTM row is the small LSTM (--encoder-preset small_lstm)
on either. The learning benchmark is benchmarks/bench_learning.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, repeat_timed, write_json

import experiment as xp

SCRIPT = ROOT / "ppo_symbol_agent.py"
SMALL_TRANSFORMER = xp.SMALL_TRANSFORMER_ENCODER  # --encoder-preset small_transformer
SMALL_LSTM = xp.SMALL_LSTM_ENCODER  # --encoder-preset small_lstm
MLP = xp.CPU_ENCODER  # --encoder-preset cpu
MINIBATCHES = 8  # per update epoch (4 epochs), as ppo_symbol_agent.py's default


def encoder_flags(enc: dict) -> list[str]:
    flags = ["--encoder-preset", "as_given"]
    for k, v in enc.items():
        flags += [f"--encoder.{k.replace('_', '-')}", str(v)]
    return flags


def last_scalar(run_dir: Path, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag)[-1].value


def run_ours(enc: dict, data_flags: list[str], num_envs: int, num_steps: int, iterations: int, cwd: Path) -> float:
    """charts/SPS of ppo_symbol_agent.py after `iterations` iterations (no periodic evaluation)."""
    S = int(data_flags[data_flags.index("--data.num-symbols") + 1])
    flags = [*data_flags, *encoder_flags(enc), "--num-envs", str(num_envs), "--num-steps", str(num_steps)]
    flags += ["--total-timesteps", str(iterations * num_envs * num_steps * S), "--eval-interval", "0"]
    flags += ["--torch-threads", "1", "--exp-name", f"bench_{enc['kind']}", "--num-minibatches", str(MINIBATCHES)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ppo_symbol_agent.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run = sorted(glob.glob(str(cwd / "runs" / f"bench_{enc['kind']}__*")))[-1]
    return last_scalar(Path(run), "charts/SPS")


def run_sb3(algo: str, enc: dict, market, num_envs: int, num_steps: int, iterations: int) -> float:
    """SPS of SB3 PPO or MaskablePPO with the same encoder and heads on SB3VecEnv (every slot of one core)."""
    from gymnasium import spaces
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    from encoders import EncoderConfig, make_encoder, set_input_shapes
    from trading_env import EnvConfig

    class Extractor(BaseFeaturesExtractor):
        def __init__(self, observation_space: spaces.Dict, **cfg):
            shapes = {k: space.shape for k, space in observation_space.spaces.items()}
            config = set_input_shapes(EncoderConfig(dropout=0.0, **cfg), shapes)
            super().__init__(observation_space, features_dim=config.output_dim)
            self.encoder = make_encoder(config)

        def forward(self, obs):
            return self.encoder(obs)  # (B, output_dim); the action mask key is ignored

    from trading_env import SB3VecEnv

    venv = SB3VecEnv(market, num_envs=num_envs, config=EnvConfig(), seed=1)
    S = len(market.data.symbols)
    kw = dict(
        n_steps=num_steps,
        batch_size=num_envs * S * num_steps // MINIBATCHES,
        n_epochs=4,
        learning_rate=3e-4,
        ent_coef=0.08,
        policy_kwargs=dict(
            features_extractor_class=Extractor,
            features_extractor_kwargs=enc,
            net_arch=dict(pi=[256, 128], vf=[256, 128]),
        ),
        device="cpu",
        seed=1,
        verbose=0,
    )
    if algo == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        model = MaskablePPO("MultiInputPolicy", venv, **kw)
    else:
        from stable_baselines3 import PPO

        model = PPO("MultiInputPolicy", venv, **kw)
    steps = iterations * num_envs * S * num_steps
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    return steps / (time.perf_counter() - t0)


def speed(args) -> dict:
    from market_data import DataConfig, prepare_market

    data_flags = ["--data.num-symbols", str(args.num_symbols), "--data.no-sl-signals", "--data.years", "2"]
    market = prepare_market(DataConfig(num_symbols=args.num_symbols, sl_signals=False, years=2.0))
    cases = {"mlp": (MLP, args.iterations)}
    if torch.cuda.is_available():
        cases["transformer"] = ({"kind": "transformer"}, args.iterations)  # the seed's transformer
    else:
        cases["transformer"] = (SMALL_TRANSFORMER, 1)
    cases["lstm"] = (SMALL_LSTM, 1)  # the small LSTM of the learning benchmark, on either device
    record = {"num_envs": args.num_envs, "num_symbols": args.num_symbols, "num_steps": args.num_steps}
    record["torch_threads"] = 1
    record["minibatches"], record["update_epochs"] = MINIBATCHES, 4
    with tempfile.TemporaryDirectory() as tmp:
        for name, (enc, iterations) in cases.items():
            row = {"encoder": enc, "iterations": iterations, "repeats": args.repeats}
            runs = {"ours": [], "sb3_ppo": [], "maskable_ppo": []}
            for _ in range(args.repeats):  # interleaved, so that a busy spell of the machine hits every framework
                runs["ours"].append(run_ours(enc, data_flags, args.num_envs, args.num_steps, iterations, Path(tmp)))
                for algo in ("sb3_ppo", "maskable_ppo"):
                    runs[algo].append(run_sb3(algo, enc, market, args.num_envs, args.num_steps, iterations))
            for who, values in runs.items():
                row[f"{who}_sps"], row[f"{who}_sps_runs"] = statistics.median(values), values
            print(name, row, flush=True)
            record[name] = row
            record[f"ratio_vs_sb3_{name}"] = row["ours_sps"] / row["sb3_ppo_sps"]
            record[f"ratio_vs_maskable_{name}"] = row["ours_sps"] / row["maskable_ppo_sps"]
    record["goals"] = {"ratio_vs_sb3_mlp": 3.0, "ratio_vs_sb3_transformer": 1.5}
    return record


def median_seconds(fn, repeats: int, calls: int = 3) -> float:
    """Median over `repeats` of the mean wall time of `calls` calls of fn (common.repeat_timed, after one warm-up)."""

    def batch():
        for _ in range(calls):
            fn()

    return statistics.median(repeat_timed(batch, repeats)) / calls


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Measured throughput of one (m, k) @ (k, n) matmul in GFLOP/s (2 m k n floating-point operations)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return 2 * m * k * n / median_seconds(lambda: a @ b, repeats) / 1e9


def roofline(args) -> dict:
    """How close the small transformer's training is to what this CPU's matmul units allow, on one torch thread.

    FLOPs per symbol-step of training, counted by torch.utils.flop_counter.FlopCounterMode (the matrix products,
    which is what it counts; the attention's through PyTorch's math backend, since it does not count the fused CPU
    kernel): one forward pass in the rollout plus, per update epoch, one forward and backward pass of the
    policy on each sample (a minibatch of num_envs x num_steps / MINIBATCHES env-steps x num_symbols symbols, the
    training script's shapes; the loss is a stand-in of the same output shapes, its FLOPs are negligible). Against it,
    the measured throughput of a large square matmul (the CPU's practical peak, fp32 and bf16) and of the encoder's
    own largest matmul. And the measured forward+backward+Adam rate of the whole policy, interleaved in this process:
    through torch's nn.TransformerEncoderLayer, through encoders.encoder_layer (the scripts' path), with bf16
    autocast and with torch.compile. Roofline symbol-steps/s = peak / FLOPs per symbol-step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import encoders
    from encoders import EncoderConfig, SymbolPolicy, random_observation

    S, epochs = args.num_symbols, 4
    batch = args.num_envs * args.num_steps // MINIBATCHES  # env-steps per minibatch
    cfg = EncoderConfig(**SMALL_TRANSFORMER, dropout=0.0)
    torch.manual_seed(0)
    policy = SymbolPolicy(S, cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-4)
    obs = random_observation(batch, S)
    rollout_obs = random_observation(args.num_envs, S)
    samples = batch * S

    def train_step(model=policy, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, value = model(obs)
            loss = logits.float().logsumexp(-1).mean() + value.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel is not counted: the same maths is
        train_step()
    train_flops = counter.get_total_flops() / samples
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        policy(rollout_obs)
    rollout_flops = counter.get_total_flops() / (args.num_envs * S)
    per_step = rollout_flops + epochs * train_flops
    r = args.repeats * 3
    peak = {
        "fp32_2048": matmul_gflops(2048, 2048, 2048, torch.float32, r),
        "bf16_2048": matmul_gflops(2048, 2048, 2048, torch.bfloat16, r),
        "fp32_qkv": matmul_gflops(samples * policy.encoder.num_tokens, cfg.d_model, 3 * cfg.d_model, torch.float32, r),
    }
    short_path = encoders.encoder_layer
    variants = {
        "torch_layers": lambda: train_step(),
        "encoder_layer": lambda: train_step(),
        "encoder_layer_bf16": lambda: train_step(bf16=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(r):  # interleaved, so that a busy spell of the machine hits every variant
        for name, fn in variants.items():
            encoders.encoder_layer = (lambda layer, x: layer(x)) if name == "torch_layers" else short_path
            rates[name].append(samples / median_seconds(fn, 1))
    encoders.encoder_layer = short_path
    fb = {name: statistics.median(v) for name, v in rates.items()}
    try:  # torch.compile of the policy, the short path inside; backends vary, so a failure is recorded
        compiled = torch.compile(policy)
        t0 = time.perf_counter()
        train_step(compiled)
        compile_s = time.perf_counter() - t0
        fb["encoder_layer_compiled"] = samples / median_seconds(lambda: train_step(compiled), r)
        compile_note = f"compiled in {compile_s:.1f} s"
    except Exception as e:  # noqa: BLE001 - torch.compile raises many types; the record says which
        compile_note = f"{type(e).__name__}: {e}"[:300]
    record = {
        "encoder": SMALL_TRANSFORMER, "torch_threads": torch.get_num_threads(), "minibatch_samples": samples,
        "flops_per_sample_forward": rollout_flops, "flops_per_sample_train_step": train_flops,
        "update_epochs": epochs, "flops_per_symbol_step": per_step, "matmul_gflops": peak,
        "train_step_samples_per_s": fb, "compile": compile_note,
        "train_step_gflops": {k: v * train_flops / 1e9 for k, v in fb.items()},
        "roofline_sps": {k: peak[k] * 1e9 / per_step for k in ("fp32_2048", "bf16_2048")},
    }  # fmt: skip
    print(json.dumps(record, indent=1), flush=True)
    return record


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the record here (e.g. benchmarks/results/train.json)")
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--num-symbols", type=int, default=10)
    p.add_argument("--num-steps", type=int, default=64)
    p.add_argument("--iterations", type=int, default=2, help="PPO iterations timed per framework (MLP)")
    p.add_argument("--repeats", type=int, default=3, help="runs per framework (interleaved); medians are reported")
    p.add_argument(
        "--roofline",
        action="store_true",
        help="the small transformer's training FLOPs against this "
        "CPU's matmul throughput, and its train-step rate by path (bf16, compile); with --json, that file",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    write_json(args.json, roofline(args) if args.roofline else speed(args))
