"""Reliability of the training pipeline end to end: ppo_symbol_agent.py run as a subprocess with tiny settings.

- determinism: the same seed and settings give the same summary.json on CPU (wall-clock fields aside);
- bad input at every entry point fails with a sentence naming the input, before any training, and leaves no run
  folder that looks complete;
- SIGINT during training leaves a loadable checkpoint and a run folder marked incomplete, and --resume finishes it;
- --resume refuses to continue a run on other data, and --eval-checkpoint refuses another feature set.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_script, script_env
from test_experiment import assert_one_line_error

import validate_stage5 as gate

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ppo_symbol_agent.py"
ENV = script_env()
# 4 symbols x 2 envs x 32 steps = 256 symbol-steps a rollout; no SL fit, no cache, no periodic evaluation
TINY = [
    "--num-envs",
    "2",
    "--num-steps",
    "32",
    "--num-minibatches",
    "2",
    "--update-epochs",
    "1",
    "--eval-interval",
    "0",
]
TINY += ["--data.no-sl-signals", "--data.no-cache"]
SYNTHETIC = ["--data.num-symbols", "4", "--data.years", "0.5"]
WALL_CLOCK = {"SPS", "run_name", "run_dir", "command", "peak_memory_mib"}  # fields allowed to differ between
# identical runs (the command line differs by its --run-dir; the peak memory by the allocator's timing)


def train(tmp_path: Path, *flags: str, runs: str = "runs", timeout: float = 300) -> subprocess.CompletedProcess:
    """ppo_symbol_agent.py with TINY settings in tmp_path (conftest's runner; it does not raise on failure)."""
    flags = (*TINY, "--run-dir", str(tmp_path / runs), *flags)
    return run_script("ppo_symbol_agent.py", tmp_path, *flags, check=False, timeout=timeout)


def run_folders(tmp_path: Path, runs: str = "runs") -> list[Path]:
    root = tmp_path / runs
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def write_bars(folder: Path, symbols=("AAA", "BBB", "CCC", "IDX"), days: int = 220, seed: int = 0) -> Path:
    """Hourly bars (7 a day on weekdays) of random walks, one parquet file per symbol."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    days_idx = pd.bdate_range("2023-01-02", periods=days, tz="America/New_York")
    ts = pd.DatetimeIndex([d + pd.Timedelta(hours=10 + h) for d in days_idx for h in range(7)]).tz_convert("UTC")
    for sym in symbols:
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.004, len(ts))))
        open_ = close * np.exp(rng.normal(0, 0.001, len(ts)))
        bars = {"timestamp": ts, "open": open_, "close": close}
        bars["high"] = np.maximum(open_, close) * (1 + rng.uniform(0, 0.002, len(ts)))
        bars["low"] = np.minimum(open_, close) * (1 - rng.uniform(0, 0.002, len(ts)))
        bars["volume"] = rng.integers(1000, 5000, len(ts)).astype(float)
        pd.DataFrame(bars).to_parquet(folder / f"{sym}.parquet")
    return folder


def strip_wall_clock(obj):
    if isinstance(obj, dict):
        return {k: strip_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK and "seconds" not in k}
    if isinstance(obj, list):
        return [strip_wall_clock(v) for v in obj]
    return obj


def test_same_seed_gives_the_same_summary(tmp_path):
    # 2,560 symbol-steps: 10 rollouts, crossing the 256-bar episode end (truncation, bootstrap, reset)
    flags = [*SYNTHETIC, "--seed", "3", "--total-timesteps", "2560"]
    first, second = train(tmp_path, *flags, runs="a"), train(tmp_path, *flags, runs="b")
    assert first.returncode == 0, first.stderr[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    (run_a,), (run_b,) = run_folders(tmp_path, "a"), run_folders(tmp_path, "b")
    a = json.loads((run_a / "summary.json").read_text())
    b = json.loads((run_b / "summary.json").read_text())
    assert a["status"] == "complete" and a["global_step"] == 2560
    assert {"backtest", "telemetry"} <= set(a), "summary.json lacks the backtest or telemetry it should compare"
    assert strip_wall_clock(a) == strip_wall_clock(b)


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    return write_bars(tmp_path_factory.mktemp("data") / "bars")


def test_user_data_folder_trains(tmp_path, user_data):
    """The control for the bad-input cases below: the same folder and flags, unbroken, train to the end."""
    done = train(tmp_path, "--data.source", str(user_data), "--data.benchmark", "IDX", "--total-timesteps", "768")
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = run_folders(tmp_path)
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"


def corrupt_parquet(folder: Path) -> None:
    (folder / "BBB.parquet").write_bytes(b"this is not a parquet file")


def nan_bar(folder: Path) -> None:
    bars = pd.read_parquet(folder / "BBB.parquet")
    bars.loc[500, "close"] = float("nan")
    bars.to_parquet(folder / "BBB.parquet")


BAD_INPUTS = {
    # case: (flags, how to break a copy of the user data or None, words the error must contain)
    "missing data folder": (
        ["--data.source", "{tmp}/no_such_folder"],
        None,
        ["no_such_folder", "no such file or folder", "Pass synthetic"],
    ),
    "corrupt parquet": (["--data.source", "{data}"], corrupt_parquet, ["BBB.parquet"]),
    "NaN bar": (["--data.source", "{data}"], nan_bar, ["BBB.parquet", "row", "NaN"]),
    "unknown symbol": (["--data.source", "{data}", "--data.symbols", "AAA", "ZZZ"], None, ["ZZZ"]),
    "unknown benchmark": (["--data.source", "{data}", "--data.benchmark", "QQQ"], None, ["QQQ", "benchmark"]),
    "more minibatches than env-steps": ([*SYNTHETIC, "--num-minibatches", "128"], None, ["--num-minibatches"]),
    "fewer steps than one rollout": ([*SYNTHETIC, "--total-timesteps", "100"], None, ["--total-timesteps"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_before_training(tmp_path, user_data, case):
    flags, breaker, words = BAD_INPUTS[case]
    data = tmp_path / "bars"
    data.mkdir()
    for f in user_data.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    if breaker is not None:
        breaker(data)
    flags = [f.format(tmp=tmp_path, data=data) for f in flags]
    if "--total-timesteps" not in flags:
        flags += ["--total-timesteps", "768"]
    done = train(tmp_path, *flags)
    assert done.returncode != 0, f"{case}: the training accepted the bad input"
    error = done.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in error, f"{case}: the error does not name {word!r}: {error}"
    assert "iter " not in done.stdout, f"{case}: training started before the error"
    for run in run_folders(tmp_path):  # a run folder may exist, but must not look complete
        summary = run / "summary.json"
        assert not summary.exists() or json.loads(summary.read_text()).get("status") != "complete"
        assert not (run / "checkpoint.pt").exists()


def test_sigint_leaves_a_resumable_incomplete_run(tmp_path):
    total = 4096  # 16 rollouts of 256 symbol-steps; periodic checkpoints every 2, the interrupt after the 3rd
    flags = [*TINY, *SYNTHETIC, "--seed", "5", "--total-timesteps", str(total), "--save-model"]
    flags += ["--eval-interval", "2", "--run-dir", str(tmp_path / "runs")]
    cmd = [sys.executable, str(SCRIPT), *flags]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a shell's background jobs inherit SIGINT ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    interrupted_at = 768  # the last rollout the run logged before the interrupt
    assert proc.returncode != 0, f"an interrupted run must not exit as a success:\n{out[-2000:]}"
    (run,) = run_folders(tmp_path)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] != "complete", "the interrupted run folder looks complete"
    with pytest.raises(gate.GateError, match="incomplete"):
        gate.check_run(run, gate.Args())
    assert (run / "checkpoint.pt").is_file(), f"SIGINT left no checkpoint in {run}:\n{out[-2000:]}"
    ckpt_step = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["global_step"]
    assert 0 < ckpt_step < total

    resumed = subprocess.run(
        [*cmd, "--resume", str(run / "checkpoint.pt")], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stdout[-1000:] + resumed.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == total
    steps = gate.read_scalars(run)["charts/policy_action_entropy_mean"].steps
    assert steps.tolist() == list(range(256, total + 1, 256)), "the resumed run's log has gaps or extra steps"

    # The checkpoint must hold the state at the interrupt, not only the last periodic save (work would be lost).
    assert ckpt_step >= interrupted_at, (
        f"the checkpoint is from step {ckpt_step}, before the interrupt at {interrupted_at}"
    )


# A run with the supervised signals fitted (tiny fits), so that a feature set has something to differ in
SAVED = [*SYNTHETIC, "--data.sl-signals", "--data.sl-epochs", "1", "--data.sl-max-samples", "256", "--data.sl-folds"]
SAVED += ["2", "--no-stress", "--eval-samples", "1", "--save-model"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, Path]:
    """The folder it runs in and the run folder of a finished 2-iteration run with a checkpoint."""
    tmp = tmp_path_factory.mktemp("saved")
    done = train(tmp, *SAVED, "--total-timesteps", "512")
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = run_folders(tmp)
    return tmp, run


def test_resume_refuses_other_data_and_continues_the_same(saved_run):
    """--data.seed 7 on a d0 run's checkpoint once continued on another market inside the d0 run's folder."""
    tmp, run = saved_run
    checkpoint = run / "checkpoint.pt"
    before = checkpoint.read_bytes(), (run / "summary.json").read_text()
    other = train(tmp, *SAVED, "--total-timesteps", "768", "--data.seed", "7", "--resume", str(checkpoint))
    # "--data.": the data differ; a script that passes its settings to resume_run names the flag itself (--data.seed)
    assert_one_line_error(other, "--resume", str(checkpoint), "--data.")
    assert "iter " not in other.stdout
    assert (checkpoint.read_bytes(), (run / "summary.json").read_text()) == before, (
        "the refused resume wrote to the run"
    )

    same = train(tmp, *SAVED, "--total-timesteps", "768", "--resume", str(checkpoint))
    assert same.returncode == 0, same.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 768


def test_evaluation_refuses_another_feature_set(saved_run):
    """--data.no-sl-signals on a checkpoint trained with the signals once evaluated it with exit 0 and no warning."""
    tmp, run = saved_run
    checkpoint = str(run / "checkpoint.pt")
    other = train(tmp, *SAVED, "--data.no-sl-signals", "--eval-checkpoint", checkpoint, runs="eval")
    assert_one_line_error(other, "--eval-checkpoint", "--data.no-sl-signals here, --data.sl-signals in its run")
    assert not run_folders(tmp, "eval")

    same = train(tmp, *SAVED, "--eval-checkpoint", checkpoint, runs="eval")
    assert same.returncode == 0, same.stderr[-2000:]
    (evaluation,) = run_folders(tmp, "eval")
    assert json.loads((evaluation / "summary.json").read_text())["status"] == "complete"


def test_ctrl_c_while_the_data_is_prepared_is_one_line(tmp_path):
    """SIGINT while the signal classifiers are fitted (a phase outside the training loop): exit status 130, one
    line on stderr, no traceback."""
    cmd = [sys.executable, str(SCRIPT), *SYNTHETIC, "--data.no-cache", "--run-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    for line in proc.stdout:
        if line.startswith("data: signal classifiers 1/"):  # the classifiers are being fitted
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-1000:], err[-2000:])
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err


def test_ctrl_c_during_the_final_backtest_is_one_line(tmp_path):
    """SIGINT after training, while the final backtest and its stress tests run: exit status 130 at once, one line
    on stderr, no traceback, the run folder left incomplete."""
    flags = [*TINY, "--data.num-symbols", "6", "--data.years", "2", "--total-timesteps", "384"]
    cmd = [sys.executable, str(SCRIPT), *flags, "--run-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    for line in proc.stdout:
        if line.startswith("final backtest on the test split"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-1000:], err[-2000:])
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err
    (run,) = run_folders(tmp_path)
    assert json.loads((run / "summary.json").read_text())["status"] == "incomplete"
