"""Stage 5 cross-seed behavioural gate for the symbol-agent PPO.

Runs short retrains of `ppo_symbol_agent.py` (one per seed), reads each run's tensorboard scalars and
`summary.json`, and checks the anti-collapse criteria of the Stage 5 validation checklist
(`seeds/003_e948c49433db3186.txt`, "Validation Checklist"):

| criterion            | rule (defaults)                                                                        |
|----------------------|----------------------------------------------------------------------------------------|
| entropy_by_step      | `charts/policy_action_entropy_mean` >= 0.10 at the last point logged by step 300,000   |
| entropy_floor        | after that step, every point below 0.09 coincides with an entropy-guard intervention   |
| voluntary_trade_rate | mean of `charts/voluntary_trade_rate` >= 0.10                                          |
| sanitizer_delta      | mean of `charts/sanitizer_trade_delta` < 15 percentage points                          |
| action_share         | no executed non-HOLD action above 60% of the `charts/action_distribution/*` histogram  |
| diversity_bonus      | mean of `charts/diversity_bonus` >= 0.08                                               |

The seed's thresholds, restated in the training script's units (DESIGN.md, "Exploration in the right units"):
entropies are normalised by log(number of allowed actions), so the seed's 0.20 and 0.18 nats over the 7 actions
become 0.20 / log 7 = 0.10 and 0.18 / log 7 = 0.09; steps are symbol-steps, the seed's x 50 (its 6k-step check and
5-10k-step retrains become 300k and 500k), so that the gate can judge the README's main command. The action-share
cap applies to the non-HOLD actions: a profitable long/flat trader holds most of the time (HOLD shares of 0.67-0.94
for the rules we measured), and the collapse the seeds feared is one trading action repeated.

Usage:
    python validate_stage5.py                                   # retrain seeds 42, 1337, 9001 and check them
    python validate_stage5.py --total-timesteps 400000 -- --ent-coef 0.1   # args after `--` go to the training script
    python validate_stage5.py --runs runs/a runs/b             # check existing run folders, no retraining

Exit status: 0 when every seed passes every criterion, 1 when a criterion fails (each failure is printed with
its seed), 2 when a run cannot be checked at all (missing folder, no event file, run marked incomplete,
training crashed).
"""

import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tyro

from experiment import report_user_errors, require


@dataclass
class Args:
    # Experiment
    seeds: tuple[int, ...] = (42, 1337, 9001)
    """seeds of the short retrains (one training run per seed)"""
    total_timesteps: int = 500_000
    """training symbol-steps per seed, as counted by the training script's `global_step` (the seed's 10k x 50)"""
    runs: list[str] | None = None
    """existing run folders to check instead of retraining (each holds an event file and summary.json)"""
    out_dir: str = "runs/stage5"
    """folder for the JSON and Markdown reports and the training logs"""
    train_script: str = "ppo_symbol_agent.py"
    """training script run once per seed (resolved next to this file when relative)"""
    train_args: tuple[str, ...] = ()
    """extra arguments for the training script; everything after a bare `--` on the command line lands here"""
    num_envs: int | None = None
    """--num-envs passed to the training script (default: the script's own)"""
    num_steps: int | None = None
    """--num-steps passed to the training script (default: the script's own); `train_args` may override both"""
    train_timeout_s: float = 3600.0
    """a training subprocess running longer than this is stopped and its seed reported as failed"""

    # Criteria (defaults are the Stage 5 checklist)
    entropy_by_step: int = 300_000
    """symbol-step by which the policy-action entropy must be at least `min_entropy_by_step` (the seed's 6k x 50)"""
    min_entropy_by_step: float = 0.10
    """minimum normalised policy-action entropy at the last point logged at or before `entropy_by_step` (the
seed's 0.20 nats / log 7)"""
    entropy_floor: float = 0.09
    """after `entropy_by_step` the entropy may drop below this only at steps where the entropy guard intervened"""
    min_voluntary_trade_rate: float = 0.10
    """minimum run mean of the voluntary trade rate (fraction of slot-steps with a trade the policy chose)"""
    max_sanitizer_delta_pp: float = 15.0
    """maximum run mean of the sanitizer delta (policy minus executed trade rate) in percentage points"""
    max_action_share: float = 0.60
    """maximum share of any single executed non-HOLD action in the run's action histogram"""
    action_share_from: float = 0.5
    """the histogram covers the rollouts logged after this fraction of the run's last step (0: the whole run;
the default, the second half, is where a collapse shows instead of being averaged away by the start)"""
    min_diversity_bonus: float = 0.08
    """minimum run mean of the diversity bonus"""

    # Tensorboard tags written by the training script
    entropy_tag: str = "charts/policy_action_entropy_mean"
    """policy-action entropy of each rollout"""
    guard_tag: str = "charts/entropy_guard_interventions"
    """entropy-guard interventions: a running total (see `guard_tag_cumulative`)"""
    guard_tag_cumulative: bool = True
    """True: `guard_tag` is a running total (an intervention is a rise); False: a per-rollout count (> 0)"""
    voluntary_tag: str = "charts/voluntary_trade_rate"
    """fraction of slot-steps whose executed action is a trade the policy chose"""
    sanitizer_tag: str = "charts/sanitizer_trade_delta"
    """policy trade rate minus executed trade rate, logged in percentage points by both training scripts"""
    action_prefix: str = "charts/action_distribution/"
    """prefix of the per-action executed-action shares; the rest of the tag is the action's name"""
    diversity_tag: str = "charts/diversity_bonus"
    """mean diversity bonus of each rollout"""
    extra_tags: tuple[str, ...] = (
        "charts/executed_action_entropy_mean",
        "charts/consecutive_action_violations",
        "charts/ep_unique_actions",
        "charts/executed_vs_policy_trades",
        "charts/episodic_return",
    )
    """further tags whose run means appear in the telemetry diff (absent tags are skipped)"""


CRITERIA = (
    "entropy_by_step",
    "entropy_floor",
    "voluntary_trade_rate",
    "sanitizer_delta",
    "action_share",
    "diversity_bonus",
)


class GateError(Exception):
    """A run that cannot be checked at all (as opposed to one that fails a criterion)."""


class Series(NamedTuple):
    """One scalar tag: steps (N,) int64 ascending and unique, values (N,) float64."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class Check:
    criterion: str
    passed: bool
    value: float | None
    threshold: float
    detail: str


def make_series(points) -> Series:
    """(step, value) or (step, value, wall_time) -> Series sorted by step.

    A step logged twice (a run resumed from a checkpoint older than its last log) keeps the value written last:
    the latest wall time, or the later position when no wall time is given.
    """
    by_step = {}
    for order, (step, value, *wall) in enumerate(points):
        key = (wall[0], order) if wall else (0.0, order)
        if int(step) not in by_step or key >= by_step[int(step)][0]:
            by_step[int(step)] = (key, float(value))
    by_step = {step: value for step, (_, value) in by_step.items()}
    steps = np.array(sorted(by_step), dtype=np.int64)
    return Series(steps, np.array([by_step[s] for s in steps], dtype=np.float64))


# ALGO LOGIC: the criteria, as pure functions of metric series
def check_entropy_by_step(entropy: Series | None, by_step: int, minimum: float) -> Check:
    name = "entropy_by_step"
    if entropy is None or len(entropy.steps) == 0:
        return Check(name, False, None, minimum, "no policy-action entropy was logged")
    if entropy.steps[-1] < by_step:
        return Check(
            name,
            False,
            None,
            minimum,
            f"the run ends at step {entropy.steps[-1]}, before the check step {by_step}: "
            "train longer or lower --entropy-by-step",
        )
    before = entropy.steps <= by_step
    if not before.any():
        return Check(name, False, None, minimum, f"no entropy point logged at or before step {by_step}")
    step, value = int(entropy.steps[before][-1]), float(entropy.values[before][-1])
    passed = math.isfinite(value) and value >= minimum
    return Check(name, passed, value, minimum, f"entropy {value:.3f} at step {step} (needs >= {minimum})")


def guard_steps(guard: Series | None, cumulative: bool) -> np.ndarray:
    """Steps at which the entropy guard intervened, from a running total or a per-rollout count."""
    if guard is None or len(guard.steps) == 0:
        return np.zeros(0, dtype=np.int64)
    if cumulative:
        rises = np.diff(guard.values, prepend=0.0) > 0
        return guard.steps[rises]
    return guard.steps[guard.values > 0]


def check_entropy_floor(
    entropy: Series | None, guard: Series | None, after_step: int, floor: float, cumulative: bool = True
) -> Check:
    """Every entropy point after `after_step` below `floor` must share its rollout with a guard intervention.

    A point at step s covers the rollout (previous entropy step, s]; a guard intervention logged in that interval
    (normally at s itself) excuses the dip.
    """
    name = "entropy_floor"
    if entropy is None or len(entropy.steps) == 0:
        return Check(name, False, None, floor, "no policy-action entropy was logged")
    interventions = guard_steps(guard, cumulative)
    previous = np.concatenate([[np.iinfo(np.int64).min], entropy.steps[:-1]])
    late = entropy.steps > after_step
    if not late.any():
        return Check(name, False, None, floor, f"no entropy point logged after step {after_step}")
    unguarded = []
    for lo, step, value in zip(previous[late], entropy.steps[late], entropy.values[late], strict=True):
        if not (value >= floor):  # NaN counts as a dip
            if not ((interventions > lo) & (interventions <= step)).any():
                unguarded.append((int(step), float(value)))
    lowest = float(np.min(entropy.values[late]))
    if unguarded:
        shown = ", ".join(f"{v:.3f} at step {s}" for s, v in unguarded[:3])
        more = f" and {len(unguarded) - 3} more" if len(unguarded) > 3 else ""
        return Check(
            name, False, lowest, floor, f"entropy fell below {floor} without a guard intervention: {shown}{more}"
        )
    guarded = int((entropy.values[late] < floor).sum())
    return Check(name, True, lowest, floor, f"lowest {lowest:.3f} after step {after_step}; {guarded} guarded dips")


def check_mean(name: str, series: Series | None, threshold: float, at_least: bool, unit: str = "") -> Check:
    """Run mean of a tag against a threshold: >= when `at_least`, else strictly <."""
    if series is None or len(series.steps) == 0:
        return Check(name, False, None, threshold, f"no points logged for {name}")
    value = float(np.mean(series.values))
    passed = math.isfinite(value) and (value >= threshold if at_least else value < threshold)
    relation = ">=" if at_least else "<"
    return Check(name, passed, value, threshold, f"run mean {value:.3f}{unit} (needs {relation} {threshold}{unit})")


def action_shares(actions: dict[str, Series], from_step: float = 0) -> dict[str, float]:
    """Each action's share of the histogram of the rollouts logged after from_step (all of them when 0): rollouts
    are equal in size, so this is the mean over rollouts of the per-rollout shares."""
    shares = {}
    for name, s in actions.items():
        keep = s.values[s.steps > from_step] if from_step > 0 else s.values
        shares[name] = float(np.mean(keep)) if len(keep) else float("nan")
    return shares


def check_action_share(actions: dict[str, Series], maximum: float, from_fraction: float = 0.0) -> Check:
    """No executed non-HOLD action above `maximum` of the histogram over the run's steps after `from_fraction` of
    it (HOLD may dominate: a profitable trader mostly holds)."""
    name = "action_share"
    if not actions:
        return Check(name, False, None, maximum, "no per-action distribution was logged")
    from_step = from_fraction * max((int(s.steps[-1]) for s in actions.values() if len(s.steps)), default=0)
    shares = action_shares(actions, from_step)
    trading = [a for a in shares if a != "HOLD"]
    top = max(trading, key=lambda a: -1.0 if math.isnan(shares[a]) else shares[a])
    value = shares[top]
    passed = all(math.isfinite(v) for v in shares.values()) and value <= maximum
    window = f"steps > {from_step:.0f}" if from_fraction > 0 else "the whole run"
    return Check(
        name,
        passed,
        value,
        maximum,
        f"largest executed non-HOLD action share {value:.1%} ({top}) over {window} (max {maximum:.0%})",
    )


def evaluate(scalars: dict[str, Series], args: Args) -> list[Check]:
    """All criteria for one run, from its scalar tags."""
    actions = {tag[len(args.action_prefix) :]: s for tag, s in scalars.items() if tag.startswith(args.action_prefix)}
    entropy = scalars.get(args.entropy_tag)
    return [
        check_entropy_by_step(entropy, args.entropy_by_step, args.min_entropy_by_step),
        check_entropy_floor(
            entropy, scalars.get(args.guard_tag), args.entropy_by_step, args.entropy_floor, args.guard_tag_cumulative
        ),
        check_mean("voluntary_trade_rate", scalars.get(args.voluntary_tag), args.min_voluntary_trade_rate, True),
        check_mean("sanitizer_delta", scalars.get(args.sanitizer_tag), args.max_sanitizer_delta_pp, False, unit=" pp"),
        check_action_share(actions, args.max_action_share, args.action_share_from),
        check_mean("diversity_bonus", scalars.get(args.diversity_tag), args.min_diversity_bonus, True),
    ]


def telemetry(scalars: dict[str, Series], checks: list[Check], args: Args) -> dict[str, float]:
    """The per-run numbers compared across seeds: the criteria's values plus the run means of `extra_tags`."""
    row = {c.criterion: c.value for c in checks if c.value is not None}
    for tag in args.extra_tags:
        if tag in scalars and len(scalars[tag].values):
            row[tag.split("/", 1)[-1]] = float(np.mean(scalars[tag].values))
    guard = guard_steps(scalars.get(args.guard_tag), args.guard_tag_cumulative)
    if args.guard_tag in scalars:
        row["guard_interventions"] = float(len(guard))
    return row


def telemetry_diff(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, min, max and spread (max - min) across runs of every telemetry number at least one run has."""
    metrics = sorted({m for row in rows.values() for m in row})
    diff = {}
    for metric in metrics:
        values = np.array([row[metric] for row in rows.values() if metric in row], dtype=np.float64)
        diff[metric] = {
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
            "spread": float(values.max() - values.min()),
            "runs": int(len(values)),
        }
    return diff


# Run folders: event files and summary.json
def read_scalars(run_dir: Path) -> dict[str, Series]:
    """Every scalar tag of a run folder's event files (all of them, in order, so a resumed run reads whole)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GateError(f"Run folder {run_dir} does not exist: pass a folder under runs/ written by the training.")
    if not any(run_dir.glob("events.out.tfevents.*")):
        raise GateError(
            f"Run folder {run_dir} holds no tensorboard event file (events.out.tfevents.*): "
            "it is not a training run, or the training failed before logging."
        )
    # No purging of "orphaned" steps: duplicates are settled by wall time in make_series, whatever the order in
    # which tensorboard lists the event files (it sorts names as strings).
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {tag: make_series((e.step, e.value, e.wall_time) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def read_summary(run_dir: Path) -> dict:
    """runs/<run>/summary.json, refusing a run the training script marked incomplete."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise GateError(
            f"Run folder {run_dir} has no summary.json: the training did not finish "
            "(resume it with the training script's --resume, or retrain)."
        )
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GateError(f"{path} is not valid JSON ({e}): the training was cut off while writing it; retrain.") from e
    status = summary.get("status")
    if status != "complete":
        raise GateError(
            f"Run folder {run_dir} is marked incomplete (summary.json status {status!r}, not 'complete'): the "
            "training was interrupted or is still running; finish it with the training script's --resume "
            "runs/<run>/checkpoint.pt, or retrain."
        )
    return summary


def check_run(run_dir: Path, args: Args) -> dict:
    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir)
    summary = read_summary(run_dir)
    checks = evaluate(scalars, args)
    row = telemetry(scalars, checks, args)
    agent = summary.get("backtest", {}).get("agent", {})  # the final test-split backtest, when the run has one
    for key in ("sharpe", "total_return", "max_drawdown", "trades"):
        if isinstance(agent.get(key), (int, float)):
            row[f"test_{key}"] = float(agent[key])
    return {
        "run": str(run_dir),
        "seed": summary.get("seed", summary.get("args", {}).get("seed")),
        "global_step": summary.get("global_step"),
        "passed": all(c.passed for c in checks),
        "checks": [asdict(c) for c in checks],
        "telemetry": row,
    }


# Retraining
def train_seed(seed: int, args: Args, out_dir: Path) -> Path:
    """Run the training script for one seed and return its run folder (found as the new folder under runs/)."""
    script = Path(args.train_script)
    if not script.is_absolute():
        script = Path(__file__).resolve().parent / script
    if not script.is_file():
        raise GateError(f"Training script {script} does not exist: pass --train-script PATH.")
    runs_root = out_dir / "runs"
    runs_root.mkdir(parents=True, exist_ok=True)
    before = set(runs_root.iterdir())
    tag = f"stage5_s{seed}"
    cmd = [sys.executable, str(script), "--seed", str(seed), "--total-timesteps", str(args.total_timesteps)]
    cmd += ["--num-envs", str(args.num_envs)] if args.num_envs else []
    cmd += ["--num-steps", str(args.num_steps)] if args.num_steps else []
    cmd += ["--exp-name", tag, "--run-dir", str(runs_root), *args.train_args]
    log_path = out_dir / f"train_seed{seed}.log"
    print(f"[stage5] seed {seed}: {' '.join(cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.train_timeout_s)
        except subprocess.TimeoutExpired as e:
            raise GateError(f"Training for seed {seed} ran past --train-timeout-s {args.train_timeout_s:g}") from e
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise GateError(f"Training for seed {seed} exited with status {proc.returncode}; log tail:\n{tail}")
    new = sorted(p for p in (set(runs_root.iterdir()) - before) if p.is_dir() and tag in p.name)
    if len(new) != 1:
        raise GateError(
            f"Cannot find the run folder of seed {seed} under {runs_root.resolve()} (expected one new folder "
            f"whose name contains {tag!r}, found {[p.name for p in new]})."
        )
    return new[0]


# Reports
def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    lines = ["# Stage 5 cross-seed gate", "", f"Result: **{'PASS' if report['passed'] else 'FAIL'}**", ""]
    lines += ["| run | seed | " + " | ".join(CRITERIA) + " |", "|---|---|" + "---|" * len(CRITERIA)]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {Path(r['run']).name} | {r['seed']} | " + " | ".join(["error"] * len(CRITERIA)) + " |")
            continue
        cells = [f"{fmt(c['value'])} {'ok' if c['passed'] else '**FAIL**'}" for c in r["checks"]]
        lines.append(f"| {Path(r['run']).name} | {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "Thresholds: " + ", ".join(f"{k}={v}" for k, v in report["thresholds"].items()), ""]
    lines += [
        "## Telemetry across seeds",
        "",
        "| metric | mean | min | max | spread | runs |",
        "|---|---|---|---|---|---|",
    ]
    for metric, d in report["telemetry_diff"].items():
        lines.append(
            f"| {metric} | {d['mean']:.4f} | {d['min']:.4f} | {d['max']:.4f} | {d['spread']:.4f} | {d['runs']} |"
        )
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def print_tables(report: dict) -> None:
    width = max([len(Path(r["run"]).name) for r in report["results"]] + [3])
    print(f"\n{'run':<{width}}  {'seed':>5}  " + "  ".join(f"{c:>20}" for c in CRITERIA))
    for r in report["results"]:
        cells = (
            ["error"] * len(CRITERIA)
            if "error" in r
            else [f"{fmt(c['value'])} {'ok' if c['passed'] else 'FAIL'}" for c in r["checks"]]
        )
        print(f"{Path(r['run']).name:<{width}}  {r['seed']!s:>5}  " + "  ".join(f"{c:>20}" for c in cells))
    print(f"\n{'telemetry':<36} {'mean':>10} {'min':>10} {'max':>10} {'spread':>10}")
    for metric, d in report["telemetry_diff"].items():
        print(f"{metric:<36} {d['mean']:>10.4f} {d['min']:>10.4f} {d['max']:>10.4f} {d['spread']:>10.4f}")


def plot_criteria(report: dict, path: Path) -> None:
    """One panel per criterion: each seed's value as a bar (green passed, red failed) beside the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["results"] if "checks" in r]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, criterion in zip(axes.ravel(), CRITERIA, strict=True):
        checks = [next(c for c in r["checks"] if c["criterion"] == criterion) for r in runs]
        values = [c["value"] if c["value"] is not None else 0.0 for c in checks]
        colors = ["tab:green" if c["passed"] else "tab:red" for c in checks]
        ax.bar([str(r["seed"]) for r in runs], values, color=colors)
        if checks:
            ax.axhline(checks[0]["threshold"], color="black", ls="--", lw=1, label="threshold")
            ax.legend(fontsize=7)
        ax.set_title(criterion, fontsize=10)
        ax.set_xlabel("seed")
    fig.suptitle(f"Stage 5 gate: {'PASS' if report['passed'] else 'FAIL'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Own arguments, and the training script's (everything after the first bare `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    own, extra = split_argv(sys.argv[1:] if argv is None else argv)
    args = tyro.cli(Args, args=own)
    args.train_args = (*args.train_args, *extra)
    require(bool(args.seeds or args.runs), "give at least one --seeds value or --runs folder")
    require(0.0 < args.max_action_share <= 1.0, "--max-action-share is a fraction in (0, 1]")
    require(args.entropy_floor <= args.min_entropy_by_step, "--entropy-floor is above --min-entropy-by-step")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    targets = [(None, Path(r)) for r in args.runs] if args.runs else [(s, None) for s in args.seeds]
    results = []
    for seed, run_dir in targets:
        try:
            if run_dir is None:
                run_dir = train_seed(seed, args, out_dir)
            result = check_run(run_dir, args)
            if result["seed"] is None:
                result["seed"] = seed
        except GateError as e:
            result = {"run": str(run_dir or f"seed{seed}"), "seed": seed, "passed": False, "error": str(e)}
            print(f"[stage5] error: {e}", file=sys.stderr, flush=True)
        results.append(result)

    failures = []
    for r in results:
        who = f"seed {r['seed']} ({r['run']})"
        if "error" in r:
            failures.append(f"{who}: {r['error'].splitlines()[0]}")
        failures += [f"{who}: {c['criterion']} failed: {c['detail']}" for c in r.get("checks", []) if not c["passed"]]
    thresholds = {
        "entropy_by_step": args.entropy_by_step,
        "min_entropy_by_step": args.min_entropy_by_step,
        "entropy_floor": args.entropy_floor,
        "min_voluntary_trade_rate": args.min_voluntary_trade_rate,
        "max_sanitizer_delta_pp": args.max_sanitizer_delta_pp,
        "max_action_share": args.max_action_share,
        "min_diversity_bonus": args.min_diversity_bonus,
    }
    report = {
        "passed": not failures,
        "thresholds": thresholds,
        "train_command": None
        if args.runs
        else [args.train_script, "--total-timesteps", args.total_timesteps, "--num-envs", args.num_envs]
        + ["--num-steps", args.num_steps, *args.train_args],
        "results": results,
        "telemetry_diff": telemetry_diff({r["run"]: r["telemetry"] for r in results if "telemetry" in r}),
        "failures": failures,
    }
    (out_dir / "stage5_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "stage5_report.md").write_text(markdown(report))
    plot_criteria(report, out_dir / "stage5_criteria.png")
    print_tables(report)
    print(f"\nreports in {out_dir}: stage5_report.json, stage5_report.md, stage5_criteria.png")
    if failures:
        print("\nStage 5 gate FAILED:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 2 if any("error" in r for r in results) else 1
    print("\nStage 5 gate passed for every run.")
    return 0


if __name__ == "__main__":
    report_user_errors()  # bad flags: one message naming the flag and the fix, exit status 2, no traceback
    sys.exit(main())
