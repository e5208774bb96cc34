"""Training speed of mappo_master.py at S = 10 and S = 143 symbols.

Runs the script itself (a subprocess, periodic evaluation off, no supervised signal fit) for a few iterations at each
universe size and reads back what it logged: `charts/SPS` (symbol-steps per second, the same unit as
ppo_symbol_agent.py's) after the first iteration, which pays one-off warm-up costs, master decisions per second,
and the rollout / update split from `perf/*_seconds`. The market preparation and the final test backtest are outside
the timed loop.

    python benchmarks/bench_mappo.py --quick --json benchmarks/results/mappo_quick.json
    python benchmarks/bench_mappo.py --json benchmarks/results/mappo.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_info, write_json

SCRIPT = ROOT / "mappo_master.py"


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def measure(num_symbols: int, num_envs: int, num_steps: int, iterations: int, threads: int, workdir: Path) -> dict:
    """Train for `iterations` iterations at this size; per-iteration figures exclude the first iteration."""
    batch = num_symbols * num_envs * num_steps
    flags = [
        "--data.num-symbols", str(num_symbols), "--data.years", "1.0", "--data.no-sl-signals", "--data.no-cache",
        "--num-envs", str(num_envs), "--num-steps", str(num_steps), "--total-timesteps", str(batch * iterations),
        "--eval-interval", "0", "--run-dir", str(workdir / f"S{num_symbols}"), "--no-cuda",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mappo_master.py failed at S={num_symbols}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run = next((workdir / f"S{num_symbols}").iterdir())
    s = scalars(run)
    rollout = [v for _, v in s["perf/rollout_seconds"]][1:]
    update = [v for _, v in s["perf/update_seconds"]][1:]
    per_iter = [r + u for r, u in zip(rollout, update, strict=True)]
    sps = batch / statistics.median(per_iter)
    decisions = num_envs * (num_steps // 7)
    summary = json.loads((run / "summary.json").read_text())
    return {
        "num_symbols": num_symbols,
        "num_envs": num_envs,
        "num_steps": num_steps,
        "iterations_timed": len(per_iter),
        "symbol_steps_per_iteration": batch,
        "train_symbol_steps_per_s": sps,
        "master_decisions_per_s": decisions / statistics.median(per_iter),
        "rollout_seconds_median": statistics.median(rollout),
        "update_seconds_median": statistics.median(update),
        "script_sps_whole_run": summary["sps"],
        "encoder": summary["encoder"],
        "torch_threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer envs and iterations (about a minute)")
    parser.add_argument("--json", default=None, help="write the record to this path")
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS of the training process (1 on a shared CPU)"
    )
    opts = parser.parse_args()
    iterations = 3 if opts.quick else 5
    sizes = [(10, 8 if opts.quick else 16), (143, 2 if opts.quick else 4)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for num_symbols, num_envs in sizes:
            results[f"S{num_symbols}"] = measure(num_symbols, num_envs, 70, iterations, opts.threads, Path(tmp))
            r = results[f"S{num_symbols}"]
            print(
                f"S={num_symbols:4d} E={num_envs:3d}: {r['train_symbol_steps_per_s']:10.0f} symbol-steps/s, "
                f"{r['master_decisions_per_s']:7.1f} master decisions/s "
                f"(rollout {r['rollout_seconds_median']:.2f} s + update {r['update_seconds_median']:.2f} s)",
                file=sys.stderr,
            )
    write_json(
        opts.json,
        {
            "benchmark": "mappo_master training speed",
            "unit": "symbol-steps per second (one symbol agent's decision on one bar), median over iterations 2..",
            "quick": opts.quick,
            "machine_torch_default_threads": machine_info().get("torch_threads"),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
