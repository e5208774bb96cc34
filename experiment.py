"""Run bookkeeping that no one reads to understand the algorithm: the checks of the experiment flags both scripts
share (each script's Args writes the flags out), the run folder and its summary.json, checkpoints and resume, RNG
states, tensorboard / MLflow logging, the torchrun helpers and the SIGINT stop. The scripts reach it as
`import experiment as xp`, so that a call site reads as bookkeeping.

The training scripts (ppo_symbol_agent.py, mappo_master.py) import it; it imports nothing from them. The algorithm
itself (rollout, GAE, the PPO loss, masked sampling, entropy control, the update loop) lives in the scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from encoders import EncoderConfig, SymbolPolicy, encoder_config_from_dict
from market_data import DataConfig, PreparedMarket, UserInputError, check_data_config, prepare_market

# ---------------------------------------------------------------------------------------------------------------
# The checks of the experiment flags every script has (each script's Args writes them out)
# ---------------------------------------------------------------------------------------------------------------

# the symbol-steps of one rollout that --num-envs' default aims at: 16 envs x 64 steps x 10 symbols
ROLLOUT_SYMBOL_STEPS = 10_240


def check_minibatches(args) -> None:
    """Minibatches split a rollout's env-steps (num_steps * num_envs) and keep every symbol."""
    T, E = args.num_steps, args.num_envs
    require(
        1 <= args.num_minibatches <= T * E and (T * E) % args.num_minibatches == 0,
        f"--num-minibatches ({args.num_minibatches}) must divide num_steps * num_envs ({T * E}): minibatches split "
        "env-steps and keep every symbol; lower --num-minibatches or raise --num-steps / --num-envs",
    )


def resolve_num_envs(args, num_symbols: int) -> int:
    """--num-envs left out: enough envs for about ROLLOUT_SYMBOL_STEPS symbol-steps a rollout, from 1 to 16 (16 up to
    10 symbols at 64 steps, 1 at 143), so that a run makes about as many PPO updates per symbol-step whatever the
    universe. At 143 symbols 16 envs gave 13 updates in 2M symbol-steps and learned less (benchmarks/BENCHMARKS.md,
    "Learning at 143 symbols"). Sets args.num_envs and checks the minibatches against it."""
    if args.num_envs is None:
        args.num_envs = int(min(16, max(1, round(ROLLOUT_SYMBOL_STEPS / (args.num_steps * num_symbols)))))
    check_minibatches(args)
    return args.num_envs


def check_run_args(args) -> None:
    """The checks of the flags both scripts share, before any data is prepared: a rollout that minibatches can split
    (by env-steps, keeping every symbol), --resume and --eval-checkpoint apart, a test split other than the training
    split and, where weights are selected on --eval-split (--final-weights best_val), other than that split too,
    MLflow installed for --track, and the --data.* flags."""
    T, E = args.num_steps, args.num_envs
    require(T > 0 and (E is None or E > 0), f"--num-steps ({T}) and --num-envs ({E}) must be positive")
    if E is not None:  # otherwise checked once the number of symbols sets it (resolve_num_envs)
        check_minibatches(args)
    require(
        not (args.resume and args.eval_checkpoint),
        "--resume and --eval-checkpoint exclude each other: resume a "
        "run to train it further, or evaluate a checkpoint without training",
    )
    require(
        args.split != args.test_split,
        f"--split and --test-split are both {args.split!r}: the final backtest "
        "would grade the agent on the bars it trained on; choose another --test-split",
    )
    selects = (
        getattr(args, "final_weights", "last") == "best_val" and args.eval_interval > 0 and not args.eval_checkpoint
    )
    require(
        not selects or args.eval_split != args.test_split,
        f"--final-weights best_val picks the weights on "
        f"--eval-split {args.eval_split!r}, which is also the graded --test-split: selection would see the bars "
        "it is graded on; choose another --eval-split or --test-split, or --final-weights last",
    )
    require(
        getattr(args, "pretrain", "none") == "none" or args.eval_split != args.test_split,
        f"--pretrain picks its encoder on --eval-split {args.eval_split!r}, which is also the graded --test-split: "
        "choose another --eval-split or --test-split, or leave --pretrain out",
    )
    require(
        not args.track or importlib.util.find_spec("mlflow") is not None,
        "--track logs to MLflow, which is not installed: `pip install mlflow-skinny` (or drop --track)",
    )
    if args.track:
        check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
    require(args.walk_forward >= 0, f"--walk-forward {args.walk_forward}: the number of folds, 0 (off) or more")
    require(
        not args.walk_forward or not (args.resume or args.eval_checkpoint),
        "--walk-forward trains every fold from scratch; --resume or --eval-checkpoint a fold's own run folder instead",
    )
    require(
        not args.walk_forward or int(os.environ.get("WORLD_SIZE", "1")) == 1,
        "--walk-forward runs its folds "
        "one after the other in processes of their own; under torchrun, run each fold with --data.folds K "
        "--data.fold k instead",
    )
    require(
        not args.walk_forward or not args.data.folds,
        "--walk-forward K sets --data.folds and --data.fold itself; give one or the other",
    )
    check_data_config(args.data)


def rollout_iterations(args, rank: int) -> int:
    """args.num_iterations from --total-timesteps and the rollout (args.batch_size symbol-steps a rank): at least one
    unless a checkpoint is only evaluated; a total that is not whole rollouts is announced (rank 0)."""
    per_rollout = args.batch_size * args.world_size
    args.num_iterations = args.total_timesteps // per_rollout
    require(args.num_iterations >= 1 or args.eval_checkpoint is not None, f"--total-timesteps ({args.total_timesteps}) "
            f"is below one rollout of num_steps * num_envs * num_symbols * world_size = {per_rollout} symbol-steps; "
            "raise it or shrink the rollout")  # fmt: skip
    steps = args.num_iterations * per_rollout
    if rank == 0 and args.num_iterations and steps != args.total_timesteps:  # say so: a rollout is indivisible
        print(f"--total-timesteps {args.total_timesteps} runs {steps} symbol-steps: {args.num_iterations} whole "
              f"rollout(s) of {per_rollout}")  # fmt: skip
    return args.num_iterations


def without_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the flags `names` (each with one value, as `--name value` or `--name=value`)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in names:
            skip = True
        elif not token.startswith(tuple(f"{n}=" for n in names)):
            out.append(token)
    return out


def run_walk_forward(script: str, args, key: str = "agent") -> Path:
    """--walk-forward K: run `script` once per fold (fold k with --data.folds K --data.fold k, each trained from
    scratch in a process of its own, one after the other) with the user's other flags, into one parent folder, then
    stitch the folds' test blocks into the out-of-sample report (backtest.walk_forward_report). Exit status: a
    failed fold's, or 130 on Ctrl-C. Returns the parent folder."""
    import backtest

    K = args.walk_forward
    name = f"{args.exp_name}__{data_tag(args.data)}__walkforward{K}-{args.data.fold_window}__{args.seed}"
    parent = Path(args.run_dir) / f"{name}__{int(time.time())}"
    parent.mkdir(parents=True)
    flags = ("--walk-forward", "--walk_forward", "--run-dir", "--run_dir", "--data.folds", "--data.fold")
    argv = without_flags(sys.argv[1:], flags)
    runs = []
    for k in range(K):
        print(f"walk-forward: fold {k + 1} of {K}", flush=True)
        cmd = [sys.executable, script, *argv, "--walk-forward", "0", "--data.folds", str(K), "--data.fold", str(k)]
        try:
            proc = subprocess.run([*cmd, "--run-dir", str(parent)])
        except KeyboardInterrupt:
            print(f"walk-forward interrupted in fold {k + 1} of {K}; the finished folds are in {parent}", flush=True)
            raise SystemExit(130) from None
        if proc.returncode != 0:
            print(f"walk-forward: fold {k + 1} of {K} failed (exit {proc.returncode}); see {parent}", file=sys.stderr)
            raise SystemExit(proc.returncode)
        runs.append(max((p for p in parent.iterdir() if p.is_dir() and p not in runs), key=lambda p: p.stat().st_mtime))
    print(backtest.walk_forward_report(runs, parent, key))
    print(f"walk-forward report: {parent / 'walk_forward.md'}")
    return parent


# ---------------------------------------------------------------------------------------------------------------
# Setup: seeding, torchrun's process group, the encoder preset, the market prepared once per machine
# ---------------------------------------------------------------------------------------------------------------


def report_user_errors() -> None:
    """From now on an uncaught UserInputError (a bad file, a bad flag, flags that contradict each other) ends the
    process with its one-line message on stderr and exit status 2, without a traceback: bad input is the user's to
    fix, not a crash. Ctrl-C outside the training loop (preparing the data, fitting the classifiers, the final
    backtest; the loop itself stops at the end of its rollout, see stop_on_sigint) ends it with one line and exit
    status 130. Any other exception keeps Python's traceback."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, UserInputError):
            sys.stdout.flush()
            print(f"error: {value}", file=sys.stderr, flush=True)
            os._exit(2)
        if issubclass(kind, KeyboardInterrupt):
            sys.stdout.flush()
            print("interrupted (Ctrl-C); a run folder it had started stays marked incomplete", file=sys.stderr)
            os._exit(130)
        default(kind, value, tb)

    sys.excepthook = hook


def require(condition: bool, message: str) -> None:
    """A check of the user's flags: raise UserInputError(message) unless condition (message: the flags and the fix)."""
    if not condition:
        raise UserInputError(message)


def seed_everything(seed: int, torch_threads: int, torch_deterministic: bool) -> None:
    """Seed python, numpy and torch; torch's intra-op threads (0: its default) and deterministic algorithms."""
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    if torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def init_distributed(cuda: bool) -> tuple[int, int, torch.device]:
    """torchrun's world size and rank (1 and 0 without torchrun), the process group (nccl on CUDA, gloo on CPU)
    and this process's device."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    use_cuda = cuda and torch.cuda.is_available()
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return world_size, rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


# CPU default encoder: an MLP, about 100x faster than the default transformer on CPU (docs/training.md).
CPU_ENCODER = {"kind": "mlp", "d_model": 128, "output_dim": 128}
# the small transformer of the speed and learning benchmarks (bench_train.py, bench_learning.py's ppo_transformer)
SMALL_TRANSFORMER_ENCODER = {"kind": "transformer", "d_model": 64, "nhead": 4, "num_layers": 1, "dim_feedforward": 128,
                             "output_dim": 64}  # fmt: skip
# a small LSTM of the small transformer's width and depth (bench_learning.py's ppo_lstm arm)
SMALL_LSTM_ENCODER = {"kind": "lstm", "d_model": 64, "output_dim": 64, "alt_layers": 1}
ENCODER_PRESETS = {"cpu": CPU_ENCODER, "small_transformer": SMALL_TRANSFORMER_ENCODER, "small_lstm": SMALL_LSTM_ENCODER}


def encoder_preset(encoder: EncoderConfig, preset: str, use_cuda: bool) -> tuple[EncoderConfig, str]:
    """--encoder-preset: auto is `small_transformer` on CUDA (the seed's larger transformer, `as_given`, has no
    learning measurement; the small one has: benchmarks/BENCHMARKS.md) and `cpu` (the MLP, for time) otherwise;
    cpu, small_transformer and small_lstm fill the encoder fields left at their (seed transformer) defaults from
    CPU_ENCODER, SMALL_TRANSFORMER_ENCODER or SMALL_LSTM_ENCODER. Returns the encoder and the preset applied."""
    preset = preset if preset != "auto" else ("small_transformer" if use_cuda else "cpu")
    if preset in ENCODER_PRESETS:
        default = EncoderConfig()
        fill = {k: v for k, v in ENCODER_PRESETS[preset].items() if getattr(encoder, k) == getattr(default, k)}
        encoder = dataclasses.replace(encoder, **fill)
    return encoder, preset


def prepare_market_on_ranks(cfg: DataConfig, rank: int, world_size: int) -> PreparedMarket:
    """prepare_market on every rank, rank 0 first: it fills the cache that the other ranks then read, so that no two
    processes write it at once."""
    market = prepare_market(cfg, progress=lambda message: print(message, flush=True)) if rank == 0 else None
    if world_size > 1:
        dist.barrier()
    return market if rank == 0 else prepare_market(cfg)


# ---------------------------------------------------------------------------------------------------------------
# The run folder and logging: summary.json, tensorboard scalars, MLflow with --track
# ---------------------------------------------------------------------------------------------------------------

# tensorboard tag -> MLflow metric name fixed by the seeds (Stage 5 telemetry); other tags keep their own name.
MLFLOW_NAMES = {
    "charts/policy_action_entropy_mean": "policy_action_entropy_mean",
    "charts/executed_action_entropy_mean": "executed_action_entropy_mean",
    "charts/voluntary_trade_rate": "voluntary_trade_rate_mean",
    "charts/sanitizer_trade_delta": "sanitizer_trade_delta_mean",
    "charts/ep_unique_actions": "ep_unique_actions_mean",
    "charts/diversity_bonus": "ep_diversity_bonus_mean",
}


def summary_telemetry(metrics: dict) -> dict:
    """The charts/* scalars under their MLflow names, without the prefix: summary.json's "telemetry"."""
    return {MLFLOW_NAMES.get(k, k.split("/", 1)[1]): v for k, v in metrics.items() if k.startswith("charts/")}


def data_tag(cfg: DataConfig) -> str:
    """What the run trains on, for its folder name: synthetic-s0.3-10y-10sym or the data file's / folder's name."""
    if cfg.source == "synthetic":
        foresight = (f"-f{cfg.regime_foresight:g}" if cfg.regime_foresight else "") + (
            f"-e{cfg.edge_regime}" if cfg.edge_regime != "off" else ""
        )
        foresight += f"-l{cfg.lead_lag:g}" if cfg.lead_lag is not None else ""  # the lead-lag market (0: placebo)
        tag = f"synthetic-s{cfg.signal_strength:g}{foresight}-{cfg.years:g}y-{cfg.num_symbols}sym-d{cfg.seed}"
    else:
        tag = Path(cfg.source).stem.replace("__", "_") or "data"
    return tag + (f"-fold{cfg.fold}of{cfg.folds}" if cfg.folds else "")


def market_fingerprint(market: PreparedMarket) -> dict:
    """What a model trained on this market depends on, stored in checkpoints and run folders: the universe, the
    lookback, the feature sets, the calendar, the splits and a hash of the bars and observation arrays."""
    digest = hashlib.sha256()
    for a in (market.data.timestamps, market.data.close, market.technical, market.regime, market.sl_probs):
        digest.update(np.ascontiguousarray(a).tobytes())
    return {
        "source": market.data.source,
        "symbols": list(market.data.symbols),
        "lookback": int(market.lookback),
        "feature_names": list(market.feature_names),
        "regime_names": list(market.regime_names),
        "benchmark": market.data.benchmark_name,
        "bars": int(len(market.data.timestamps)),
        "first_bar": str(market.data.timestamps[0]),
        "last_bar": str(market.data.timestamps[-1]),
        "bars_per_year": float(market.data.bars_per_year),
        "splits": {k: list(v) for k, v in market.splits.items()},
        "sha256": digest.hexdigest()[:24],
    }


def check_market_matches(saved: dict, market: PreparedMarket, what: str) -> None:
    """A clear error when a checkpoint's market fingerprint does not fit this market: another universe, lookback or
    feature set (the network's inputs and heads would not mean the same)."""
    now = market_fingerprint(market)
    for key, label in (
        ("symbols", "universe"),
        ("lookback", "lookback"),
        ("feature_names", "technical features"),
        ("regime_names", "regime features"),
    ):
        if saved.get(key) != now[key]:
            raise UserInputError(
                f"{what} was trained on another {label} ({saved.get(key)!r}) than this data's ({now[key]!r}); pass "
                "the --data.* flags of its training run (its summary.json has them) or data with the same "
                f"{label}."
            )


# Settings that a resumed run may change: where and how fast it runs, how long it trains, what it records, how the
# final report is cut, and the run mode itself. Every other flag (--seed, --data.*, --env.*, --encoder.*, the
# algorithm's) shapes what is learned and must equal the checkpoint's run (resume_run). The encoder is compared as
# resolved (--encoder-preset applied), so the preset itself is free; so is mappo_master.py's --symbol-checkpoint,
# which only initialises weights that the resumed checkpoint replaces.
RUN_MODE = frozenset({"resume", "resume_allow_mismatch", "eval_checkpoint", "walk_forward"})
# Where this command writes and how it logs: never taken from a saved run (resume_defaults).
OWN_BOOKKEEPING = frozenset({"run_dir", "track", "save_model", "cuda", "torch_threads"})
RESUME_FREE = RUN_MODE | {
    "symbol_checkpoint",
    "exp_name",
    "run_dir",
    "cuda",
    "torch_threads",
    "torch_deterministic",
    "track",
    "save_model",
    "total_timesteps",
    "encoder_preset",
    "stress",
    "eval_samples",
    "data.cache",
    "data.cache_dir",
    "data.sl_threads",
}
# The --data.* settings that shape the observations beyond what the market fingerprint holds (universe, lookback,
# feature names): an agent evaluated with other values reads inputs it never saw. sl_horizon and sl_threshold define
# the signals' label, so they count only where the signals are on.
FEATURE_FLAGS = ("sl_signals", "sl_horizon", "sl_threshold", "normalization", "norm_window", "feature_clip")


def setting_flag(name: str, value) -> str:
    """How a setting is typed on the command line: ("data.seed", 7) -> "--data.seed 7", ("data.sl_signals", False)
    -> "--data.no-sl-signals", ("data.symbols", ["A", "B"]) -> "--data.symbols A B"."""
    *groups, last = name.replace("_", "-").split(".")
    prefix = "--" + "".join(f"{g}." for g in groups)
    if isinstance(value, bool):
        return prefix + ("" if value else "no-") + last
    shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
    return f"{prefix}{last} {shown}"


def setting_differences(saved: dict, args, free: frozenset | set = RESUME_FREE) -> list[str]:
    """The flags of args (the init fields of its dataclasses, nested groups dotted) whose value differs from `saved`
    (a checkpoint's args), each as "--flag NOW here, --flag SAVED in its run"; names in `free` and the
    ones the checkpoint lacks (it predates them) are skipped."""
    out = []

    def walk(obj, saved: dict, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            name = prefix + f.name
            if not f.init or name in free or not isinstance(saved, dict) or f.name not in saved:
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, saved[f.name], name + ".")
            elif _plain(value) != saved[f.name]:
                was, now = setting_flag(name, saved[f.name]), setting_flag(name, value)
                out.append(f"{now} here, {was} in its run")

    walk(args, saved, "")
    return out


def data_differences(saved: dict, market: PreparedMarket) -> list[str]:
    """How this market differs from a checkpoint's market fingerprint beyond universe, lookback and features (which
    check_market_matches refuses outright): another source, calendar, splits, or other bars or features (hash)."""
    now = market_fingerprint(market)
    keys = ("source", "benchmark", "bars", "first_bar", "last_bar", "bars_per_year", "splits")
    diffs = [f"{k} {saved[k]!r} vs {now[k]!r}" for k in keys if k in saved and saved[k] != now[k]]
    if "sha256" in saved and saved["sha256"] != now["sha256"]:
        diffs.append(f"bars and features hash {saved['sha256']} vs {now['sha256']}")
    if not diffs:
        return []
    return [f"the data ({', '.join(diffs)}: other files or other --data.* flags than its run's)"]


def feature_differences(saved: dict, market: PreparedMarket, data: DataConfig | None = None) -> list[str]:
    """The FEATURE_FLAGS whose value in a checkpoint's args["data"] (`saved`) differs from `data`, the --data.*
    settings the market was prepared with; without them, what the market itself shows (whether the supervised
    signals were fitted)."""
    now = {"sl_signals": bool(market.sl_metrics)} if data is None else {k: getattr(data, k) for k in FEATURE_FLAGS}
    sl_on = saved.get("sl_signals") and now["sl_signals"]
    keys = [k for k in FEATURE_FLAGS if k in now and k in saved and (sl_on or k not in ("sl_horizon", "sl_threshold"))]
    return [
        f"{setting_flag('data.' + k, now[k])} here, {setting_flag('data.' + k, saved[k])} in its run"
        for k in keys
        if saved[k] != now[k]
    ]


def check_features_match(flag: str, path: str, saved_args: dict, market: PreparedMarket, data=None) -> None:
    """A UserInputError naming each --data.* flag of FEATURE_FLAGS whose value differs from the one the checkpoint
    `path` (passed with `flag`) was trained with (feature_differences)."""
    changes = feature_differences(saved_args.get("data") or {}, market, data)
    if changes:
        raise UserInputError(
            f"{flag} {path} was trained on another feature set: {'; '.join(changes)}. Give the --data.* flags of its "
            "run (its summary.json holds its command line), so that the agent reads the inputs it learned from"
        )


def run_metadata(args, device) -> dict:
    """What reproduces a run: the command line, the git commit and whether the tree was dirty, the versions of the
    packages that shape the numbers, torch's threads and the device."""
    import importlib.metadata

    root = Path(__file__).resolve().parent
    git = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            git = {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for pkg in ("torch", "numpy", "pandas", "pyarrow", "gymnasium", "tyro", "tensorboard", "matplotlib"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": [sys.executable, *sys.argv],
        "git": git or None,
        "python": sys.version.split()[0],
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": getattr(args, "world_size", 1),
    }


def open_run(run_dir: Path, args, global_step: int, market: PreparedMarket, device):
    """Create the run folder marked incomplete with what reproduces the run (summary.json: command, commit, package
    versions, threads, device, the data's fingerprint), a tensorboard writer with the hyperparameter table and,
    with --track, an MLflow run. Returns (writer, mlflow or None)."""
    from torch.utils.tensorboard import SummaryWriter

    params = flat_params(args)
    mlflow = start_mlflow(args, run_dir.name, params) if args.track else None  # first: a failing store leaves no folder
    run_dir.mkdir(parents=True, exist_ok=True)
    write_summary(
        run_dir,
        status="incomplete",
        run_name=run_dir.name,
        global_step=global_step,
        reproduce=run_metadata(args, device),
        data=market_fingerprint(market),
    )
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in params.items()))
    add_hparams(writer, args)
    return writer, mlflow


def add_hparams(writer, args) -> None:
    """Every setting in tensorboard's HParams tab, in this run's own event file (SummaryWriter.add_hparams would
    open a sub-run), with the final backtest's trading/<test split>_sharpe and _max_drawdown as its metrics (logged
    as scalars by finish_run). Numbers and booleans keep their type; anything else is its text."""
    from torch.utils.tensorboard.summary import hparams

    values = {}

    def walk(prefix: str, obj) -> None:
        for k, v in (dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj).items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                values[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)

    walk("", args)
    metrics = {f"trading/{args.test_split}_{name}": 0.0 for name in ("sharpe", "max_drawdown")}
    for summary in hparams(values, metrics):
        writer.file_writer.add_summary(summary)


def flat_params(args) -> dict[str, str]:
    """Every setting as its own flat entry, nested groups dotted (env.reward.pnl_weight), values as strings."""
    out = {}

    def walk(prefix: str, obj) -> None:
        items = dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else obj.items()
        for k, v in items:
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = str(v)

    walk("", args)
    return out


# MLflow's database stores (a scheme, optionally +driver): they need SQLAlchemy and Alembic; mlflow-skinny lacks both.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def tracking_store(uri: str) -> str:
    """The kind of store an MLFLOW_TRACKING_URI names: "file" (unset: ./mlruns; a plain path, relative or absolute;
    a file: URI), "database" (sqlite:///..., postgresql://..., each scheme optionally +driver) or "server"
    (http(s)://..., databricks, ...)."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive (C:\mlruns), a path too
        return "file"
    return "database" if scheme.split("+", 1)[0] in DATABASE_SCHEMES else "server"


def check_tracking_uri(uri: str) -> None:
    """--track's store works with the installed MLflow: a database store needs the full `mlflow` package (the
    mlflow-skinny client has no SQLAlchemy). Checked with the flags, before the data is prepared and any run folder
    is made."""
    missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    require(
        tracking_store(uri) != "database" or not missing,
        f"MLFLOW_TRACKING_URI={uri} is a database store, which needs {' and '.join(missing)} (mlflow-skinny lacks "
        "them): `pip install mlflow`, or set MLFLOW_TRACKING_URI to a folder (a file store) or an http(s):// server, "
        "or drop --track",
    )


def start_mlflow(args, run_name: str, params: dict[str, str]):
    """An MLflow run in the store of MLFLOW_TRACKING_URI (a folder, a file: URI, a database or a server), or without
    it in a local ./mlruns file store, every setting a param. MLflow 3 keeps file stores behind an opt-in
    (MLFLOW_ALLOW_FILE_STORE=true), which a CleanRL-style --track without a server needs: it is given for every file
    store the environment does not decide on itself. A store that cannot start the run (a server that does not
    answer, a folder that cannot be written) is a UserInputError naming the store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking_store(uri) == "file":
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    try:
        if not uri:
            mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
        mlflow.set_experiment(args.exp_name)
        mlflow.start_run(run_name=run_name)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        where = f"MLFLOW_TRACKING_URI={uri}" if uri else "./mlruns"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserInputError(
            f"--track could not start an MLflow run in {where} ({reason}); check the store (a server that answers, "
            "a folder you can write) or drop --track"
        ) from err
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(items[i : i + 100]))
    return mlflow


def log_scalars(writer, mlflow, metrics: dict, step: int) -> None:
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    if mlflow is not None:
        mlflow.log_metrics({MLFLOW_NAMES.get(t, t): float(v) for t, v in metrics.items()}, step=step)


def record_pretraining(run_dir: Path, writer, args, encoder: nn.Module, record: dict) -> None:
    """--pretrain's bookkeeping on rank 0: the encoder and its provenance in pretrained_encoder.pt, the record in
    summary.json at once (an interrupted run keeps it), pretrain/val_loss per epoch and pretrain/val_baseline_loss in
    tensorboard, and one line on stdout."""
    path = run_dir / "pretrained_encoder.pt"
    save_checkpoint(path, encoder, args=args, extra=record)
    write_summary(run_dir, pretrain=record)
    for epoch, loss in enumerate(record["val_loss_by_epoch"]):
        writer.add_scalar("pretrain/val_loss", loss, epoch)
    writer.add_scalar("pretrain/val_baseline_loss", record["val_baseline_loss"], 0)
    print(
        f"pretrain {args.pretrain}: {record['samples']} samples of {args.split}, {record['epochs']} epochs, "
        f"{record['wall_s']:.0f} s | {args.eval_split} loss {record['val_loss_by_epoch'][0]:.4f} -> "
        f"{record['val_loss']:.4f} at epoch {record['best_epoch']} (a constant guess: "
        f"{record['val_baseline_loss']:.4f}) | {path}"
    )


def pretraining_record(run_dir: Path) -> dict | None:
    """The pretraining record a run folder holds (pretrained_encoder.pt's provenance), or None."""
    path = run_dir / "pretrained_encoder.pt"
    return load_checkpoint(path)["extra"] if path.is_file() else None


def peak_memory_mib() -> float | None:
    """This process's peak resident memory in MiB (VmHWM of /proc/self/status, counted from the program's start,
    not from the parent it was forked from); None where there is no /proc (macOS, Windows)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return None if line is None else int(line.split()[1]) / 1024  # kB


def write_summary(run_dir: Path, **fields) -> None:
    """Merge fields into run_dir/summary.json (status, global step, backtest, telemetry, args)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(fields)
    path.write_text(json.dumps(summary, indent=2, default=float) + "\n")


def save_figures(run_dir: Path, writer, figures: dict, prefix: str, step: int) -> list[Path]:
    """Each matplotlib figure as run_dir/<prefix>_<name>.png and as a tensorboard image (backtest/<prefix>_<name>);
    the figures are closed. Returns the PNG paths."""
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in figures.items():
        path = run_dir / f"{prefix}_{name}.png"
        fig.savefig(path, dpi=100)
        writer.add_figure(f"backtest/{prefix}_{name}", fig, step, close=True)
        plt.close(fig)
        paths.append(path)
    return paths


def finish_run(
    run_dir: Path, writer, mlflow, args, figures: dict, test_report: dict, step: int, t_eval: float, **fields
) -> None:
    """The end of a completed run, on rank 0: the final backtest's pictures (PNG and tensorboard), its metrics as
    trading/<test split>_<metric>, perf/eval_seconds since t_eval, summary.json marked complete with `fields`, the
    process's peak memory (peak_memory_mib) and every setting, and the writers closed."""
    save_figures(run_dir, writer, figures, args.test_split, step)
    metrics = {f"trading/{args.test_split}_{k}": v for k, v in test_report.items() if v is not None}
    log_scalars(writer, mlflow, metrics, step)
    writer.add_scalar("perf/eval_seconds", time.time() - t_eval, step)
    write_summary(run_dir, status="complete", global_step=step, **fields, peak_memory_mib=peak_memory_mib(),
                  args=dataclasses.asdict(args))  # fmt: skip
    close_run(writer, mlflow, run_dir)


def close_run(writer, mlflow, run_dir: Path | None = None) -> None:
    """Flush and close the tensorboard writer; with --track, send the run folder's report, pictures and checkpoints
    to MLflow as artifacts and end the MLflow run."""
    writer.close()
    if mlflow is not None:
        if run_dir is not None:
            for path in sorted(run_dir.iterdir()):
                if path.suffix in (".json", ".md", ".png", ".pt"):
                    mlflow.log_artifact(str(path))
        mlflow.end_run()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume: one file per save, loadable with torch.load(weights_only=True) (no pickled code runs)
# ---------------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "trading-rl-checkpoint/1"


def _plain(obj):
    """Args and statistics as tensors and Python builtins that weights_only loading accepts: dataclasses and
    namespaces become dicts, numpy arrays tensors, numpy scalars Python numbers, paths strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, argparse.Namespace):
        return _plain(vars(obj))
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return _plain(obj.state_dict())
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return obj
    raise TypeError(
        f"save_checkpoint cannot store a {type(obj).__name__}; pass tensors, numpy arrays, numbers, strings, "
        "lists, dicts or dataclasses (or an object with state_dict())."
    )


def rng_states() -> dict:
    """The python, numpy, torch (and CUDA) generators' states as tensors and builtins (weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": (int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], *states["numpy_gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    obs_norm=None,
    args=None,
    global_step: int = 0,
    extra: dict | None = None,
) -> None:
    """Write model and optimiser state, observation-normalisation statistics (an object with state_dict() or a
    dict; numpy arrays are stored as tensors), args (dataclass, namespace or dict, stored as a dict), the global
    step and the RNG states of python, numpy, torch (and CUDA) to one file. The file is written to a temporary
    name in the same folder and renamed, so a crash never leaves a half-written checkpoint under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "obs_norm": _plain(obs_norm),
        "args": _plain(args),
        "global_step": int(global_step),
        "rng": rng_states(),
        "extra": _plain(extra),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Read a checkpoint written by save_checkpoint, load it into model (and optimizer) and return the whole payload
    ("args", "global_step", "obs_norm", "extra", ...). The model's parameter names and shapes must match the saved
    ones exactly; otherwise a ValueError lists the missing, unexpected and mis-shaped keys. restore_rng=True puts
    the python, numpy, torch (and CUDA) generators back where they were at save time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; check the path (runs/<run_name>/...).")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"Checkpoint {path} could not be read ({type(e).__name__}: {e}); the file is corrupt, "
            "truncated or not written by save_checkpoint."
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint (format {CHECKPOINT_FORMAT}).")
    load_states(payload, path, model, optimizer)
    if restore_rng:
        set_rng_states(payload["rng"])
    return payload


def load_states(payload: dict, path, model: nn.Module | None = None, optimizer=None) -> None:
    """Load a checkpoint's payload (read by load_checkpoint from `path`) into model and optimizer; a ValueError lists
    the model's missing, unexpected and mis-shaped keys, or says why the optimizer state does not fit."""
    if model is not None:
        saved, own = payload["model"], model.state_dict()
        missing = sorted(set(own) - set(saved))
        unexpected = sorted(set(saved) - set(own))
        shapes = [
            f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in saved and saved[k].shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"Checkpoint {path} does not fit the model (was it built with the same EncoderConfig, number of "
                f"symbols and head options?). Missing keys: {missing or 'none'}. Unexpected keys: "
                f"{unexpected or 'none'}. Shape mismatches: {shapes or 'none'}."
            )
        model.load_state_dict(saved)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"Checkpoint {path} holds no optimizer state; load it without an optimizer.")
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"The optimizer state in {path} does not fit this optimizer: {e}") from e


def load_user_checkpoint(flag: str, path: str, *args, **kwargs) -> dict:
    """load_checkpoint of a file the user passed with `flag`: a missing or unreadable file is a UserInputError that
    names the flag and the file."""
    try:
        return load_checkpoint(path, *args, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        raise UserInputError(f"{flag} {path}: {err}") from err


def save_run_checkpoint(run_dir: Path, model, optimizer, args, global_step: int, own: dict, extra: dict, rank: int):
    """Gather every rank's `own` state (its envs, RNG, ...) on rank 0 with this rank's RNG states added, and write
    run_dir/checkpoint.pt there: the model, optimiser, args, global step and extra, with extra["ranks"] the list."""
    ranks = gather_on_rank0(own | {"rng": rng_states()}, rank, args.world_size)
    if rank == 0:
        save_checkpoint(
            run_dir / "checkpoint.pt",
            model,
            optimizer,
            args=args,
            global_step=global_step,
            extra={**extra, "ranks": ranks},
        )


def resume_run(
    path: str,
    model,
    optimizer,
    device,
    rank: int,
    world_size: int,
    market: PreparedMarket,
    num_iterations: int,
    args=None,
    allow_mismatch: bool | None = None,
) -> tuple[int, dict, dict, Path]:
    """Load a checkpoint of save_run_checkpoint into model and optimizer and restore this rank's RNG states.
    Returns the global step, the checkpoint's extra, this rank's saved state and the run folder to continue in.
    A run that already reached num_iterations, another universe, lookback or feature set, or another number of
    processes is a clear error. So are other settings (args against the checkpoint's args, except RESUME_FREE) and
    other data (the market's fingerprint against the checkpoint's): the run would go on as another experiment in
    the same folder. allow_mismatch continues anyway and prints each difference; None: args.resume_allow_mismatch
    (the scripts' flag), False where args has none."""
    ckpt = load_user_checkpoint("--resume", path, map_location=device)
    extra = ckpt["extra"]
    if extra["iteration"] >= num_iterations:
        raise UserInputError(
            f"{path} already finished: it holds iteration {extra['iteration']} of the {num_iterations} that "
            "--total-timesteps asks for, so there is nothing to resume. Pass a larger --total-timesteps to train "
            f"further, or evaluate it with --eval-checkpoint {path}."
        )
    check_market_matches(extra.get("market", {}), market, path)
    changes = [] if args is None else setting_differences(ckpt.get("args") or {}, args)
    if not any(c.startswith("--data.") for c in changes):  # a data flag that differs explains the data already
        changes += data_differences(extra.get("market", {}), market)
    flag = hasattr(args, "resume_allow_mismatch")  # the scripts' override, where they have it
    if allow_mismatch is None:
        allow_mismatch = flag and args.resume_allow_mismatch
    if changes and not allow_mismatch:
        anyway = ", or pass --resume-allow-mismatch to continue it anyway" if flag else ""
        raise UserInputError(
            f"--resume {path}: this command differs from the checkpoint's run: {'; '.join(changes)}. Resuming would "
            "continue another experiment in its folder: give the run's settings (its summary.json holds its command "
            f"line) or start a new run{anyway}"
        )
    if changes and rank == 0:
        print(f"warning: --resume-allow-mismatch: continuing {path} with {'; '.join(changes)}", flush=True)
    if len(extra["ranks"]) != world_size:
        raise UserInputError(
            f"{path} was written by {len(extra['ranks'])} process(es); resume it with as many (got {world_size})"
        )
    try:
        load_states(ckpt, path, model, optimizer)
    except ValueError as err:
        raise UserInputError(f"--resume {path}: {err}") from err
    own = extra["ranks"][rank]
    set_rng_states(own["rng"])
    return ckpt["global_step"], extra, own, Path(path).resolve().parent


def resume_defaults(cls, argv: list[str]):
    """With --resume PATH or --eval-checkpoint PATH in argv: an instance of the script's Args (`cls`) that holds the
    settings of PATH's run, for `tyro.cli(Args, default=...)`, so that a resumed run, or an evaluation, takes the
    run's settings (its seed, its data) unless a flag says otherwise (resume_run then names each flag that does).
    None without either. The run mode (--resume, --eval-checkpoint, --walk-forward, --resume-allow-mismatch) is not
    taken from the run."""
    for flag in ("--resume", "--eval-checkpoint"):  # training resumed, or a saved agent evaluated: its settings
        path = next((b for a, b in itertools.pairwise(argv) if a == flag), None)
        path = next((a.split("=", 1)[1] for a in argv if a.startswith(f"{flag}=")), path)
        if path is not None:
            break
    else:
        return None
    saved = load_user_checkpoint(flag, path).get("args") or {}

    def build(kind, saved: dict, prefix: str):
        obj = kind()
        for f in dataclasses.fields(kind):
            name = prefix + f.name
            if not f.init or name in RUN_MODE or name in OWN_BOOKKEEPING or f.name not in saved:
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                if isinstance(saved[f.name], dict):
                    setattr(obj, f.name, build(type(value), saved[f.name], name + "."))
            else:
                setattr(obj, f.name, saved[f.name])  # checkpoints keep lists, tuples, numbers and strings as they were
        return obj

    defaults = build(cls, saved, "")
    if "encoder" in saved and hasattr(defaults, "encoder_preset"):
        # the run saved its encoder after its preset filled it: keep those fields as they are, even where today's
        # `auto` means another preset (on CUDA it was `as_given` before the small transformer); a flag overrides this
        defaults.encoder_preset = "as_given"
    return defaults


def load_for_evaluation(path: str, market: PreparedMarket, script: str, data: DataConfig | None = None) -> dict:
    """A checkpoint (checkpoint.pt or best.pt) of `script` ("ppo_symbol_agent.py" or "mappo_master.py") to evaluate
    on `market`: its payload (args, model weights, global step), after checking that the market has the universe,
    lookback and feature set it was trained on (FEATURE_FLAGS against `data`, the --data.* settings of this command;
    without them, what the market shows), plus its "encoder" (EncoderConfig). A missing, corrupt or foreign file,
    the other script's checkpoint or another feature set is a clear error."""
    payload = load_user_checkpoint("--eval-checkpoint", path)
    if not isinstance(payload.get("args"), dict) or "encoder" not in payload["args"]:
        raise UserInputError(
            f"--eval-checkpoint {path} holds no training arguments: it was not written by a training "
            "script of this repository."
        )
    expect = "symbols.actor.weights.0" if script == "mappo_master.py" else "actor.weights.0"
    if expect not in payload["model"]:
        raise UserInputError(
            f"--eval-checkpoint {path} is not a checkpoint of {script} (it was written by the other "
            "training script); evaluate it with that script."
        )
    check_market_matches((payload.get("extra") or {}).get("market", {}), market, path)
    check_features_match("--eval-checkpoint", path, payload["args"], market, data)
    payload["encoder"] = encoder_config_from_dict(payload["args"]["encoder"])  # the network it was saved with
    return payload


def load_symbol_agents(
    path: str,
    num_symbols: int,
    directive_dim: int = 4,
    market: PreparedMarket | None = None,
    data: DataConfig | None = None,
) -> tuple[SymbolPolicy, EncoderConfig]:
    """Symbol agents initialised from a ppo_symbol_agent.py checkpoint (independent mode, no directive input).

    The checkpoint's encoder settings and head layout are used. The directives are extra inputs of the heads' first
    layers: their weight rows start at zero, so the loaded agents act exactly as the checkpoint did until the MAPPO
    updates teach them to read the master's orders. With `market`, the checkpoint must have been trained on its
    universe, lookback and feature set (see load_for_evaluation for `data`). Every misfit is a UserInputError naming
    the file."""
    payload = load_user_checkpoint("--symbol-checkpoint", path)
    saved, saved_args = payload["model"], payload["args"] or {}
    if "encoder" not in saved_args or "actor.weights.0" not in saved:
        raise UserInputError(f"{path} is not a ppo_symbol_agent.py checkpoint (no encoder args or symbol heads in it).")
    if market is not None:
        check_market_matches((payload.get("extra") or {}).get("market", {}), market, path)
        check_features_match("--symbol-checkpoint", path, saved_args, market, data)
    encoder = encoder_config_from_dict(saved_args["encoder"])
    heads = saved["actor.weights.0"].shape[0]
    if heads not in (1, num_symbols):
        raise UserInputError(
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
        raise UserInputError(f"{path} does not fit SymbolPolicy({num_symbols}, {encoder.kind}): mismatched keys {bad}.")
    agent.load_state_dict(saved)
    return agent, encoder


# ---------------------------------------------------------------------------------------------------------------
# torchrun: identical initial weights, gradient all-reduce, gathering, the end-of-run weight check
# ---------------------------------------------------------------------------------------------------------------


def broadcast_parameters(model: nn.Module, world_size: int) -> None:
    """Rank 0's initial weights on every rank (each rank seeds differently, so their own initialisations differ)."""
    if world_size > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def allreduce_grads(module: nn.Module, world_size: int) -> None:
    """Average the gradients of module's trainable parameters over the torchrun processes, one flattened
    all-reduce (missing gradients count as zeros)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    torch.nn.utils.vector_to_parameters(flat, grads)
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def mean_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean of a tensor over the torchrun processes (x itself with one process)."""
    if world_size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size


def cat_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's tensor x (same shape everywhere) concatenated along dim 0, in rank order, on every rank."""
    if world_size == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def gather_on_rank0(obj, rank: int, world_size: int) -> list | None:
    """Every rank's obj as a list on rank 0 (None elsewhere); no communication with one process."""
    if world_size == 1:
        return [obj]
    objs = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, objs, dst=0)
    return objs


def leave_distributed(world_size: int, status: int = 0) -> None:
    """Under torchrun, leave the process group together and end this process with `status`; a no-op with one
    process. A barrier first, so that no rank tears gloo down while another still talks to it. Then os._exit after
    flushing, skipping the interpreter's finalisation: gloo's worker threads can still hold tensors when it runs, and
    a thread that takes the GIL during finalisation aborts the process ("terminate called without an active
    exception", exit -6; seen intermittently in CI on both ranks after destroy_process_group). Everything a run
    writes is closed before this (finish_run, exit_interrupted)."""
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def assert_ranks_agree(tensors, rank: int) -> None:
    """Every rank must end with rank 0's weights (same init, same all-reduced gradients)."""
    weights = nn.utils.parameters_to_vector(list(tensors)).detach()
    reference = weights.clone()
    dist.broadcast(reference, src=0)
    assert torch.equal(weights, reference), f"rank {rank}: weights differ from rank 0's after training"


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: stop after the current iteration, on every rank at once
# ---------------------------------------------------------------------------------------------------------------


def stop_on_sigint() -> dict:
    """Ctrl-C asks the run to stop after the current iteration (checkpoint with --save-model, folder left
    incomplete, exit status 130); a second Ctrl-C stops at once."""
    stop = {"requested": False}

    def handler(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("SIGINT: stopping after this iteration (press Ctrl-C again to stop now)", flush=True)

    signal.signal(signal.SIGINT, handler)
    return stop


def stop_at_once_on_sigint() -> None:
    """Past the training loop (the final backtest, the report): Ctrl-C stops at once, as one line and exit status 130
    (report_user_errors), instead of asking for the end of an iteration that will not come."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_interrupted(writer, run_dir: Path, global_step: int, saved: bool, rank: int, world_size: int) -> None:
    """After a Ctrl-C: no final backtest, the run folder stays marked incomplete, exit status 130."""
    if rank == 0:
        writer.close()
        hint = f"; continue with --resume {run_dir / 'checkpoint.pt'}" if saved else ""
        print(f"stopped at global_step={global_step}, run folder {run_dir} left incomplete{hint}", flush=True)
    leave_distributed(world_size, 130)
    raise SystemExit(130)


def all_ranks_stop(stop: dict, world_size: int) -> bool:
    """True when Ctrl-C reached any rank (stop_on_sigint's flag), so that all ranks stop at the same iteration."""
    stopping = torch.tensor(float(stop["requested"]))
    if world_size > 1:
        dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
    return bool(stopping.item())
