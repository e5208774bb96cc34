"""ppo_symbol_agent.py: the pure pieces (GAE, entropy control, supervised prior) and the script itself run as
a subprocess with tiny settings: run folder, summary, tensorboard tags, resume == uninterrupted, torchrun, bad flags."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_real_png, only_run, run_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ppo_symbol_agent.py"
PPO = SCRIPT.name
sys.path.insert(0, str(ROOT))
from test_encoders import cfg, make_obs  # noqa: E402

import ppo_symbol_agent as ppo  # noqa: E402
from encoders import MASKED_LOGIT, NUM_ACTIONS, SymbolPolicy, set_input_shapes  # noqa: E402
from experiment import MLFLOW_NAMES  # noqa: E402
from trading_env import ACTION_NAMES  # noqa: E402

# 3 symbols x 2 envs x 16 steps = 96 symbol-steps per iteration
TINY = [
    "--data.num-symbols", "3", "--data.years", "0.5", "--data.no-sl-signals", "--data.no-cache",
    "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "2",
    "--env.episode-length", "24", "--eval-interval", "2", "--ent-guard-warmup", "0", "--ent-bonus-warmup", "0",
    "--encoder.d-model", "32", "--encoder.output-dim", "32",
]  # fmt: skip
ITER = 3 * 2 * 16

DESIGN_TAGS = [
    "charts/policy_action_entropy_mean",
    "charts/executed_action_entropy_mean",
    "charts/executed_vs_policy_trades",
    "charts/consecutive_action_violations",
    "charts/diversity_bonus",
    "charts/voluntary_trade_rate",
    "charts/sanitizer_trade_delta",
    "charts/ep_unique_actions",
    "charts/SPS",
    "charts/learning_rate",
    "charts/ent_coef",
    "charts/entropy_guard_interventions",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/prior_cross_entropy",
    "losses/explained_variance",
    "reward/total",
    "reward/pnl",
    "trading/equity",
    "trading/val_sharpe",
    "trading/test_sharpe",
    "perf/rollout_seconds",
    "perf/update_seconds",
    "perf/eval_seconds",
    "equity/test_agent",
    "equity/test_benchmark_bh",
    "equity/test_equal_weight_bh",
    "equity/test_always_hold",
    "equity/test_random",
    "equity/test_rule_ceiling",
] + [f"charts/action_distribution/{name}" for name in ACTION_NAMES]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for the runs of this module."""
    return tmp_path_factory.mktemp("ppo")


# ---------------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------------
def test_gae_bootstraps_at_truncation_only():
    # step 0 truncated (V(final obs) = 0.9 bootstrapped), step 1 ordinary, step 2 terminated (nothing bootstrapped)
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [0.6], [0.7]])
    terminated = torch.tensor([[False], [False], [True]])
    truncated = torch.tensor([[True], [False], [False]])
    final_values = torch.tensor([[0.9], [0.0], [0.0]])
    adv, ret = ppo.compute_gae(rewards, values, terminated, truncated, final_values, torch.tensor([0.4]), gamma, lam)
    a2 = 3.0 - 0.7  # terminal: no next value
    a1 = 2.0 + gamma * 0.7 - 0.6 + gamma * lam * a2
    a0 = 1.0 + gamma * 0.9 - 0.5  # truncated: bootstrap the ended episode, do not look into the next one
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(ret[:, 0], torch.tensor([a0 + 0.5, a1 + 0.6, a2 + 0.7]))
    # a step both terminated and truncated is a termination: no bootstrap
    adv, _ = ppo.compute_gae(rewards, values, truncated, truncated, final_values, torch.tensor([0.4]), gamma, lam)
    assert adv[0, 0].item() == pytest.approx(1.0 - 0.5)
    # no episode end: the last step bootstraps next_value
    never = torch.zeros_like(terminated)
    adv, _ = ppo.compute_gae(rewards, values, never, never, final_values, torch.tensor([0.4]), gamma, lam)
    assert adv[2, 0].item() == pytest.approx(3.0 + gamma * 0.4 - 0.7)


def test_hold_then_linear_schedule():
    args = ppo.Args(ent_final=0.03, ent_min=0.03)  # the seed's schedule, its step counts x 50 (symbol-steps)
    coefs = [ppo.scheduled_ent_coef(args, s) for s in (0, 500_000, 1_500_000, 2_500_000, 10**7)]
    assert coefs == pytest.approx([0.08, 0.08, 0.055, 0.03, 0.03])
    args.ent_min = 0.05
    assert ppo.scheduled_ent_coef(args, 10**7) == pytest.approx(0.05)


def test_entropy_guard_and_bonus():
    args = ppo.Args()
    ctl = {"bonus_mult": 1.0, "guard_mult": 1.0, "interventions": 0}
    assert not ppo.update_entropy_control(args, ctl, 1_000, policy_entropy=0.1, action_entropy=0.05)  # warm-up
    assert ctl == {"bonus_mult": 1.0, "guard_mult": 1.0, "interventions": 0}
    # normalised units: the guard threshold is 0.11, the bonus target 0.40
    assert ppo.update_entropy_control(args, ctl, 250_000, policy_entropy=0.20, action_entropy=0.10)
    assert ctl["guard_mult"] == pytest.approx(1.5) and ctl["interventions"] == 1
    assert ctl["bonus_mult"] == pytest.approx(1.0 + 0.35 * 0.5)  # half the target entropy
    assert not ppo.update_entropy_control(args, ctl, 300_000, policy_entropy=1.0, action_entropy=1.0)
    assert ctl["guard_mult"] == pytest.approx(1.35) and ctl["bonus_mult"] == 1.0


def test_sl_prior():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 1, 1, 1]], dtype=torch.int8)
    neutral = ppo.sl_prior_logprobs(torch.full((2, 3), 0.5), mask, 4.0).exp()
    torch.testing.assert_close(neutral, mask.float() / mask.sum(-1, keepdim=True))
    bullish = ppo.sl_prior_logprobs(torch.full((2, 3), 0.9), mask, 4.0).exp()
    assert bullish[0, 1] > bullish[0, 0] and bullish[1, 6] > bullish[1, 0] > bullish[1, 5]
    assert bullish[mask == 0].max() < 1e-30


# ---------------------------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------------------------
def test_bad_arguments_fail_before_any_run_folder(tmp_path):
    proc = run_script(
        "ppo_symbol_agent.py", tmp_path, *TINY, "--num-minibatches", "5", "--total-timesteps", str(ITER), check=False
    )
    assert proc.returncode != 0 and "--num-minibatches" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["./mlruns", "MLFLOW_TRACKING_URI"])
def test_track_logs_metrics_params_and_artifacts_to_mlflow(tmp_path, monkeypatch, where):
    """--track uses the server of MLFLOW_TRACKING_URI when it is set (here a file store elsewhere), a local ./mlruns
    file store otherwise (mlflow-skinny is a test requirement); the seeds' metric names, every setting as its own
    flat param, and the report, pictures and checkpoint as artifacts."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / ("elsewhere" if where == "MLFLOW_TRACKING_URI" else "mlruns")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the script opts in to MLflow's file store itself
    if where == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_script(PPO, tmp_path, *TINY, "--track", "--save-model", "--total-timesteps", str(2 * ITER))
    assert store.is_dir() and (where == "./mlruns" or not (tmp_path / "mlruns").exists())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the file store back
    client = MlflowClient(tracking_uri=store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "ppo_symbol_agent"]
    (run,) = client.search_runs([experiment.experiment_id])
    for name in MLFLOW_NAMES.values():
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == 2, name  # one point per iteration
        assert all(math.isfinite(m.value) for m in history), name
    params = run.data.params
    assert params["seed"] == "1" and params["env.reward.pnl_weight"] == "0.75" and params["data.num_symbols"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"backtest.md", "backtest.json", "summary.json", "test_equity.png", "checkpoint.pt"} <= artifacts


@pytest.fixture(scope="module")
def full_run(workdir):
    """4 iterations, uninterrupted, with checkpoints."""
    proc = run_script(
        "ppo_symbol_agent.py", workdir, *TINY, "--total-timesteps", str(4 * ITER), "--save-model", "--no-anneal-lr"
    )
    return proc, only_run(workdir / "runs")


def test_run_folder_summary_and_backtest(full_run):
    proc, run = full_run
    assert "backtest on the test split" in proc.stdout and "| sharpe |" in proc.stdout
    assert "encoder preset cpu: mlp" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 4 * ITER
    assert 100 < summary["peak_memory_mib"] < 20_000  # the run's own high-water mark, for the benchmarks
    for key in ("policy_action_entropy_mean", "executed_action_entropy_mean", "voluntary_trade_rate_mean"):
        assert math.isfinite(summary["telemetry"][key])
    backtest = json.loads((run / "backtest.json").read_text())
    assert set(backtest) == {"agent", "agent_sampled", "always_hold", "random", "rule_ceiling", "benchmark_bh",
                             "equal_weight_bh", "benchmark_bh_matched", "equal_weight_bh_matched"}  # fmt: skip
    for key in ("total_return", "cagr", "sharpe", "sharpe_se", "sortino", "max_drawdown", "turnover", "trades", "costs",
                "exposure", "round_trips", "orders_cancelled", "orders_shrunk"):  # fmt: skip
        assert key in backtest["agent"]
    assert all("exposure" in b for b in backtest.values())  # every baseline reports its exposure
    assert backtest["benchmark_bh_matched"]["exposure"] == pytest.approx(backtest["agent"]["exposure"], abs=0.02)
    assert backtest["agent_sampled"]["samples"] == 3 and summary["rule"]["split"] == "train"
    assert len(summary["deciles"]) == 10 and "P(increase exposure | decile of ret_1)" in proc.stdout
    report = (run / "backtest.md").read_text()
    assert report.startswith("The agent's Sharpe on the test split is") and "\n| test | agent |" in report
    for key in ("psr", "dsr", "dsr_trials", "sharpe_bar", "bar_autocorr", "days"):
        assert key in backtest["agent"], key
    assert backtest["agent"]["dsr_trials"] == len(summary["val_sharpes"]) >= 2  # every validation sweep a trial
    scenarios = [row["scenario"] for row in summary["stress"]]
    assert scenarios[:5] == ["costs_x2", "costs_x3", "impact_x5", "latency_1_bar", "crisis_replay"]
    assert len(scenarios) == 5 + 3 and all(f"| {name} |" in report for name in scenarios)  # 3 symbols dropped
    for row in summary["stress"]:
        assert set(row["reports"]) == {"agent", "random", "rule_ceiling", "benchmark_bh_matched",
                                       "equal_weight_bh_matched"}  # fmt: skip
    assert (run / "test_equity.parquet").is_file() and (run / "test_daily_returns.parquet").is_file()
    # the per-bar files reconcile with the report: trades, costs, exposure, return, and positions with exposure
    import pandas as pd

    bars, fills = pd.read_parquet(run / "test_bars.parquet"), pd.read_parquet(run / "test_fills.parquet")
    positions = pd.read_parquet(run / "test_positions.parquet")
    for name in ("agent", "random", "rule_ceiling", "always_hold"):
        mine, own = fills[fills.strategy == name], bars[bars.strategy == name]
        assert len(mine) == backtest[name]["trades"], name
        assert mine["cost"].sum() == pytest.approx(backtest[name]["costs"], rel=1e-9, abs=1e-9), name
        assert own["exposure"].mean() == pytest.approx(backtest[name]["exposure"], rel=1e-9, abs=1e-12), name
        assert (1 + own["return"]).prod() - 1 == pytest.approx(backtest[name]["total_return"], abs=1e-12), name
    agent = bars[bars.strategy == "agent"].set_index("timestamp")
    held = positions[positions.strategy == "agent"].groupby("timestamp")["value"].sum()
    held = held.reindex(agent.index, fill_value=0.0)
    np.testing.assert_allclose(held / agent["equity"], agent["exposure"], atol=1e-12)
    assert set(bars.strategy) == set(backtest) - {"agent_sampled"}
    assert (run / "checkpoint.pt").is_file() and (run / "best.pt").is_file()
    repro = summary["reproduce"]
    assert repro["command"][1].endswith("ppo_symbol_agent.py") and repro["packages"]["torch"].startswith("2.")
    assert repro["torch_threads"] == 1 and repro["device"] == "cpu" and "dirty" in repro["git"]
    assert summary["data"]["symbols"] == ["SYN000", "SYN001", "SYN002"] and len(summary["data"]["sha256"]) == 24
    assert run.name.startswith("ppo_symbol_agent__synthetic-s0.3-0.5y-3sym-d0__1__")  # the run name says the data


def test_every_picture_is_a_real_png(full_run):
    _, run = full_run
    for name in ("equity", "drawdown", "actions", "contribution", "deciles"):
        assert_real_png(run / f"test_{name}.png")


def test_a_saved_agent_is_evaluated_without_training(full_run, workdir):
    _, run = full_run
    cwd = workdir / "eval"
    cwd.mkdir()
    proc = run_script(PPO, cwd, *TINY, "--eval-checkpoint", str(run / "best.pt"), "--test-split", "val")
    evaluated = only_run(cwd / "runs")
    summary = json.loads((evaluated / "summary.json").read_text())
    assert evaluated.name.endswith("__eval") and summary["status"] == "complete"
    assert "backtest on the val split" in proc.stdout and "iter " not in proc.stdout  # no training
    assert "evaluating" in proc.stdout and "iterations" not in proc.stdout  # the header names no training sizes
    assert (evaluated / "val_equity.png").is_file()
    # without flags, evaluation takes the checkpoint's seed and data settings
    bare = workdir / "eval_bare"
    bare.mkdir()
    run_script(PPO, bare, "--eval-checkpoint", str(run / "best.pt"), "--no-stress")
    trained, evaluated = (json.loads((r / "summary.json").read_text())["args"] for r in (run, only_run(bare / "runs")))
    assert evaluated["seed"] == trained["seed"] and evaluated["data"] == trained["data"]
    other = run_script(PPO, cwd, *TINY, "--data.num-symbols", "4", "--eval-checkpoint", str(run / "best.pt"),
                       check=False)  # fmt: skip
    assert other.returncode == 2 and "another universe" in other.stderr and "Traceback" not in other.stderr
    done = run_script(PPO, cwd, *TINY, "--total-timesteps", str(4 * ITER), "--resume", str(run / "checkpoint.pt"),
                      check=False)  # fmt: skip
    assert done.returncode == 2 and "already finished" in done.stderr and "Traceback" not in done.stderr


def test_tensorboard_tags(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = full_run
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    missing = [t for t in DESIGN_TAGS if t not in tags]
    assert not missing, f"missing tags {missing}; logged: {sorted(tags)}"
    steps = [e.step for e in acc.Scalars("charts/SPS")]
    assert steps == [ITER, 2 * ITER, 3 * ITER, 4 * ITER]  # global_step counts symbol-steps
    assert "hyperparameters/text_summary" in acc.Tags()["tensors"]


def test_hyperparameters_reach_the_hparams_tab(full_run):
    """The run's event file holds tensorboard's HParams session: every setting (nested ones dotted, numbers as
    numbers) and the final backtest's Sharpe as the metric, which is also logged as a scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run = full_run
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert {m.name.tag for m in experiment.metric_infos} == {"trading/test_sharpe", "trading/test_max_drawdown"}
    assert start.hparams["learning_rate"].number_value == pytest.approx(3e-4)
    assert start.hparams["env.reward.pnl_weight"].number_value > 0 and start.hparams["data.source"].string_value
    assert "trading/test_sharpe" in acc.Tags()["scalars"]


def test_resume_equals_uninterrupted(full_run, workdir):
    _, run = full_run
    first = workdir / "split"
    first.mkdir()
    run_script(PPO, first, *TINY, "--total-timesteps", str(2 * ITER), "--save-model", "--no-anneal-lr")
    half = only_run(first / "runs")
    assert json.loads((half / "summary.json").read_text())["global_step"] == 2 * ITER
    run_script(PPO, first, *TINY, "--total-timesteps", str(4 * ITER), "--save-model", "--no-anneal-lr",
               "--resume", str(half / "checkpoint.pt"))  # fmt: skip
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(half / "checkpoint.pt", weights_only=True)
    assert b["global_step"] == a["global_step"] == 4 * ITER
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    sa = json.loads((run / "summary.json").read_text())
    sb = json.loads((half / "summary.json").read_text())
    assert sa["backtest"]["agent"] == sb["backtest"]["agent"]
    assert {k: v for k, v in sa["telemetry"].items() if k != "SPS"} == {
        k: v for k, v in sb["telemetry"].items() if k != "SPS"
    }


def test_torchrun_two_processes(workdir):
    cwd = workdir / "ddp"
    cwd.mkdir()
    proc = run_script(
        "ppo_symbol_agent.py", cwd, *TINY, "--total-timesteps", str(4 * ITER), "--eval-interval", "0",
        launcher=["torchrun", "--standalone", "--nproc_per_node", "2"],
    )  # fmt: skip
    summary = json.loads((only_run(cwd / "runs") / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["args"]["world_size"] == 2
    assert summary["global_step"] == 4 * ITER  # two ranks, two iterations each
    assert proc.stdout.count("final backtest on the test split") == 1  # rank 0 alone reports


def sample(policy, obs, action=None, deterministic=False):
    """action, logprob, entropy in nats, value of the script's masked_policy on the policy's masked logits."""
    logits, value = policy(obs)
    action, logprob, entropy, choice = ppo.masked_policy(logits, action, deterministic)
    allowed = (logits > MASKED_LOGIT / 2).sum(-1).float()
    nats = torch.where(choice, entropy * torch.log(allowed.clamp(min=2)), torch.zeros_like(entropy))
    return action, logprob, nats, value


def test_entropy_is_normalised_by_the_number_of_allowed_actions():
    """1 = uniform over the allowed actions whatever their number; 0 where only one action is allowed."""
    logits = torch.zeros(3, 7)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0]])
    logits = torch.where(mask.bool(), logits, torch.full_like(logits, MASKED_LOGIT))
    _, _, entropy, choice = ppo.masked_policy(logits)
    torch.testing.assert_close(entropy, torch.tensor([1.0, 1.0, 0.0]))
    assert choice.tolist() == [True, True, False]
    peaked = logits.clone()
    peaked[0, 0] = 5.0  # mostly HOLD among 4 allowed
    h = ppo.masked_policy(peaked)[2][0].item()
    p = torch.softmax(peaked[0, :4], -1)
    assert h == pytest.approx((-(p * p.log()).sum() / math.log(4)).item(), rel=1e-5)
    assert ppo.choice_mean(entropy, choice).item() == pytest.approx(1.0)


def test_prior_exerts_no_pull_without_a_signal():
    """The supervised prior enters as E_pi[-log q]: with a flat prior (sl_probs 0.5) its gradient is zero, so it is
    no hidden entropy bonus (KL(pi || uniform) = log n - H(pi) would be)."""
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]], dtype=torch.int8)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, MASKED_LOGIT, MASKED_LOGIT, MASKED_LOGIT]], requires_grad=True)
    flat = ppo.sl_prior_logprobs(torch.full((1, 3), 0.5), mask, 4.0)
    (-(torch.softmax(logits, -1) * flat).sum()).backward()
    assert logits.grad.abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Masked sampling (the script's masked_policy on SymbolPolicy's masked logits)
# ---------------------------------------------------------------------------------------------------------------


def test_masked_actions_never_sampled():
    torch.manual_seed(0)
    policy = SymbolPolicy(8, cfg("mlp"), actor_gain=1.0)  # large gain: a peaked policy would find a mask leak
    obs = make_obs(1250, 8, seed=3)  # 10,000 draws
    with torch.no_grad():
        logits = policy.get_logits(obs)
        action, logprob, _, _ = sample(policy, obs)
    allowed = obs["action_mask"].bool()
    probs = torch.softmax(logits, dim=-1)
    assert (probs[~allowed] == 0).all()
    assert (logits[~allowed] == MASKED_LOGIT).all()
    assert allowed.gather(-1, action.unsqueeze(-1)).all(), "a masked action was sampled"
    assert torch.isfinite(logprob).all()
    # Every allowed action of a symbol is reachable: the mask does not collapse the policy.
    assert len(torch.unique(action)) == NUM_ACTIONS


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_entropy_and_logprob_over_allowed_actions_only(kind):
    policy = SymbolPolicy(3, cfg(kind), actor_gain=1.0).eval()
    obs = make_obs(4, 3, seed=5)
    with torch.no_grad():
        raw = policy.get_logits({**obs, "action_mask": torch.ones_like(obs["action_mask"])})  # unmasked logits
        action, logprob, entropy, _ = sample(policy, obs)
    mask = obs["action_mask"].bool()
    for b in range(4):
        for s in range(3):
            z = raw[b, s][mask[b, s]].double()
            p = torch.softmax(z, dim=0)
            h = -(p * p.log()).sum()
            assert entropy[b, s].item() == pytest.approx(h.item(), abs=1e-5)
            idx = int(mask[b, s, : action[b, s]].sum())  # position of the action among the allowed ones
            assert logprob[b, s].item() == pytest.approx(p[idx].log().item(), abs=1e-5)


def test_only_hold_allowed_gives_no_nan():
    policy = SymbolPolicy(2, cfg("mlp"))
    obs = make_obs(6, 2)
    obs["action_mask"] = torch.zeros_like(obs["action_mask"])
    obs["action_mask"][..., 0] = 1
    action, logprob, entropy, value = sample(policy, obs)
    assert (action == 0).all()
    assert torch.isfinite(logprob).all() and torch.isfinite(entropy).all()
    assert torch.allclose(logprob, torch.zeros_like(logprob)) and torch.allclose(entropy, torch.zeros_like(entropy))
    (logprob.sum() + entropy.sum() + value.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def test_given_action_and_deterministic():
    policy = SymbolPolicy(3, cfg("cnn")).eval()
    obs = make_obs(5, 3, seed=7)
    with torch.no_grad():
        a, lp, ent, v = sample(policy, obs)
        a2, lp2, ent2, v2 = sample(policy, obs, action=a)
        det, *_ = sample(policy, obs, deterministic=True)
        logits = policy.get_logits(obs)
    assert torch.equal(a, a2)
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(v, v2)
    assert torch.equal(det, logits.argmax(-1))
    assert a.dtype == torch.long and v.shape == (5, 3)
    torch.testing.assert_close(policy.get_value(obs), v)


@pytest.mark.parametrize(
    "flags, refused",
    [
        (["--eval-split", "test"], True),  # picked on test, graded on test
        (["--test-split", "val"], True),  # picked on val (the default --eval-split), graded on val
        (["--eval-split", "test", "--final-weights", "last"], False),  # no selection: the eval split is only logged
        (["--test-split", "val", "--eval-interval", "0"], False),  # no periodic evaluation, nothing to pick from
        (["--eval-split", "test", "--test-split", "val"], False),  # picked on test, graded on val: apart
    ],
)
def test_selection_never_sees_the_graded_split(tmp_path, flags, refused):
    proc = run_script(PPO, tmp_path, *TINY, "--total-timesteps", str(ITER), *flags, check=False)
    if refused:
        assert proc.returncode == 2 and "selection would see the bars it is graded on" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        summary = json.loads((only_run(tmp_path / "runs") / "summary.json").read_text())
        if "--eval-interval" in flags:  # nothing was picked: the last weights, and no best validation Sharpe
            assert summary["final_weights"] == "last" and summary["best_val_sharpe"] is None


def test_walk_forward_on_real_bars_grades_each_fold_on_unseen_bars(tmp_path):
    """--walk-forward 2 on a user's file (backtesting's daily GOOG bars): two fold runs, each trained and selected
    before its own test block, and a stitched report whose daily returns are the folds' test days, in order."""
    import backtesting  # a dev requirement: a missing install fails here
    import pandas as pd

    goog = Path(backtesting.__file__).parent / "test" / "GOOG.csv"
    flags = ["--data.source", str(goog), "--data.no-sl-signals", "--data.no-cache", "--num-envs", "2",
             "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps", "64",
             "--eval-interval", "1", "--no-stress", "--walk-forward", "2"]  # fmt: skip
    proc = run_script(PPO, tmp_path, *flags)
    parent = only_run(tmp_path / "runs")
    assert "walkforward2-expanding" in parent.name and "walk-forward, 2 folds" in proc.stdout
    folds = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: "fold1of2" in p.name)
    assert [("fold0of2" in p.name, "fold1of2" in p.name) for p in folds] == [(True, False), (False, True)]
    record = json.loads((parent / "walk_forward.json").read_text())
    embargo = json.loads((folds[0] / "summary.json").read_text())["args"]["data"]["lookback"]  # the embargo's floor
    previous_stop = None
    for run, fold in zip(folds, record["folds"], strict=True):
        splits = json.loads((run / "summary.json").read_text())["data"]["splits"]
        assert splits == fold["splits"]
        (_, tr_hi), (va_lo, va_hi), (te_lo, te_hi) = splits["train"], splits["val"], splits["test"]
        assert tr_hi + embargo <= va_lo and va_hi + embargo <= te_lo  # trained and selected before the graded bars
        assert previous_stop is None or te_lo == previous_stop
        previous_stop = te_hi
    stitched = pd.read_parquet(parent / "walk_forward_daily_returns.parquet")
    parts = [pd.read_parquet(run / "test_daily_returns.parquet") for run in folds]
    pd.testing.assert_frame_equal(stitched, pd.concat(parts))  # daily bars: no day is shared by two blocks
    assert record["stitched"]["agent"]["days"] == len(stitched) and record["stitched"]["agent"]["dsr_trials"] >= 2
    assert (parent / "walk_forward.md").read_text().startswith("The agent's Sharpe on the stitched out-of-sample")
    assert_real_png(parent / "walk_forward_equity.png")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--walk-forward", "2", "--resume", "CHECKPOINT"], "trains every fold from scratch"),
        (["--walk-forward", "2", "--data.folds", "3"], "sets --data.folds and --data.fold itself"),
        (["--data.folds", "2", "--data.fold", "2"], "--data.fold 2 must lie in 0"),
    ],
)
def test_walk_forward_flag_combinations_are_refused(full_run, tmp_path, flags, message):
    checkpoint = str(full_run[1] / "checkpoint.pt")  # a real one: resume reads its settings first
    proc = run_script(PPO, tmp_path, *TINY, *[checkpoint if f == "CHECKPOINT" else f for f in flags], check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_total_that_is_not_whole_rollouts_is_announced(tmp_path):
    proc = run_script(PPO, tmp_path, *TINY, "--total-timesteps", str(ITER + 5), "--eval-interval", "0", "--no-stress")
    assert f"--total-timesteps {ITER + 5} runs {ITER} symbol-steps: 1 whole rollout(s) of {ITER}" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# --pretrain: masked-forecast pretraining and the SL-to-RL warm start
# ---------------------------------------------------------------------------------------------------------------
def test_pretext_samples_are_the_agents_observations_with_labels_inside_the_split():
    """Each sample is the observation the core gives at its (bar, symbol), its label is the supervised signals'
    label there, and a usable label never reads a bar beyond the split (t + h < the split's end)."""
    from market_data import forward_labels, make_synthetic_prepared
    from trading_env import EnvConfig

    market = make_synthetic_prepared(num_symbols=3, years=1.0, sl_signals=False)
    h = 60  # a long horizon, so that many of the split's last decision bars lose their label
    obs, labels, ok, where = ppo.pretext_samples(market, "train", EnvConfig(), 4000, 0, h, 0.0)
    lo, hi = market.splits["train"]
    t, s = where[:, 0], where[:, 1]
    assert len(labels) == 4000 and ((t >= lo) & (t < hi - 1)).all() and set(s) == {0, 1, 2}
    assert t.min() < lo + 100 and t.max() > hi - 100  # drawn over the whole split
    expected, valid = forward_labels(market.data.close, h, 0.0)
    np.testing.assert_array_equal(labels.numpy(), expected[t, s])
    np.testing.assert_array_equal(ok.numpy(), valid[t, s] & (t + h < hi))
    assert (~ok.numpy()).any() and (t[ok.numpy()] + h < hi).all()  # the split's last bars: labels dropped
    np.testing.assert_array_equal(obs["technical"].numpy()[0], market.technical[t[0] - 23 : t[0] + 1, s[0]])
    assert "action_mask" not in obs


def test_next_return_samples_hold_every_symbol_of_a_bar_and_its_next_return_inside_the_split():
    from market_data import make_synthetic_prepared
    from trading_env import EnvConfig

    market = make_synthetic_prepared(num_symbols=3, years=1.0, sl_signals=False)
    obs, target, t = ppo.next_return_samples(market, "train", EnvConfig(), 6000, 0)
    lo, hi = market.splits["train"]
    assert obs["technical"].shape == (len(t), 3, 24, 23) and target.shape == (len(t), 3)
    assert ((t >= lo) & (t + 1 < hi)).all() and t.max() > hi - 100 and len(t) > 1900
    for i in (0, len(t) - 1):
        window = market.technical[t[i] - 23 : t[i] + 1].swapaxes(0, 1)  # (S, L, F)
        np.testing.assert_array_equal(obs["technical"][i].numpy(), window)
        np.testing.assert_array_equal(target[i].numpy(), market.technical[t[i] + 1, :, 0])  # ret_1 of the next bar


def test_masked_pretext_hides_whole_bars_and_reconstructs_them():
    tech = torch.randn(64, 24, 23)
    obs = {"technical": tech, "regime": torch.randn(64, 10)}
    x, target, hide = ppo.pretext_batch("masked", obs, None, torch.Generator().manual_seed(0))
    assert hide.shape == (64, 24) and hide.any(1).all()  # at least one bar hidden in every window
    assert 0.1 < hide.float().mean() < 0.25
    assert (x["technical"][hide] == 0).all() and torch.equal(x["technical"][~hide], tech[~hide])
    assert torch.equal(target, tech) and torch.equal(x["regime"], obs["regime"])
    head = torch.nn.Linear(8, 24 * 23)
    emb = torch.randn(64, 8)
    perfect = head(emb).view(64, 24, 23).detach()
    assert ppo.pretext_loss("masked", head, emb, perfect, hide).item() == pytest.approx(0.0, abs=1e-10)
    off = perfect + 2.0 * (~hide)[..., None]  # errors on the visible bars are not charged
    assert ppo.pretext_loss("masked", head, emb, off, hide).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("objective", ["masked", "direction", "next_return"])
def test_pretrain_fits_the_encoder_saves_it_and_logs_its_loss(workdir, objective):
    """A run with --pretrain: pretrained_encoder.pt holds the encoder and its provenance (objective, the train
    split's bars, the market), its pretext loss on the validation split falls below the first epoch's and is logged,
    the summary keeps the record, and training goes on from it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = workdir / f"pretrain_{objective}"
    flags = ["--pretrain", objective, "--pretrain-samples", "3000", "--pretrain-epochs", "3", "--total-timesteps"]
    proc = run_script(PPO, workdir, *TINY, *flags, str(2 * ITER), "--run-dir", str(out))
    run = only_run(out)
    assert f"pretrain {objective}: " in proc.stdout and "samples of train" in proc.stdout
    saved = torch.load(run / "pretrained_encoder.pt", weights_only=False)
    summary = json.loads((run / "summary.json").read_text())
    record = summary["pretrain"]
    assert record["objective"] == objective and record["split"] == "train" and record["epochs"] == 3
    assert record["bars"] == saved["extra"]["bars"] and record["market"] == saved["extra"]["market"]
    assert record["val_loss"] == min(record["val_loss_by_epoch"]) and len(record["val_loss_by_epoch"]) == 4
    assert record["val_loss"] < record["val_loss_by_epoch"][0]
    from encoders import encoder_config_from_dict, make_encoder

    encoder = make_encoder(encoder_config_from_dict(saved["args"]["encoder"]))
    encoder.load_state_dict(saved["model"])  # the encoder's weights, all of them and nothing else
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("pretrain/val_loss")] == pytest.approx(record["val_loss_by_epoch"])
    assert summary["status"] == "complete" and summary["global_step"] == 2 * ITER


def test_pretraining_changes_only_the_encoder_and_leaves_the_random_state():
    """pretrain_encoder fits the encoder in place and nothing else: the heads keep their initial weights and torch's
    global random state is as it was, so a pretrained run and a random-init run of one seed differ only there."""
    from market_data import make_synthetic_prepared
    from trading_env import VecTradingCore

    market = make_synthetic_prepared(num_symbols=3, years=1.0, sl_signals=False)
    args = ppo.Args(pretrain="direction", pretrain_samples=2048, pretrain_epochs=2, seed=5)
    args.encoder = set_input_shapes(cfg("mlp", d_model=32, output_dim=32),
                                    VecTradingCore(market, 1, seed=0).observation_shapes)  # fmt: skip
    agent = SymbolPolicy(3, args.encoder)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    state = torch.get_rng_state()
    _, record = ppo.pretrain_encoder(args, agent, market, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    after = agent.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.") for k in changed)
    assert record["objective"] == "direction" and len(record["val_loss_by_epoch"]) == 3


# ---------------------------------------------------------------------------------------------------------------
# --curriculum: staged symbol onboarding
# ---------------------------------------------------------------------------------------------------------------
def test_curriculum_stages_grow_a_fixed_subset_then_free_every_symbol():
    args = ppo.Args(curriculum=(0.1, 0.3, 0.6), curriculum_span=0.5, total_timesteps=1_200, seed=3)
    stages = [ppo.curriculum_tradable(args, step, 143) for step in (0, 199, 200, 399, 400, 599)]
    assert [int(t.sum()) for t in stages] == [15, 15, 43, 43, 86, 86]  # ceil(share x 143)
    for earlier, later in zip(stages, stages[1:], strict=False):
        assert (later >= earlier).all()  # onboarded symbols stay onboarded
    assert ppo.curriculum_tradable(args, 600, 143) is None and ppo.curriculum_tradable(args, 1_199, 143) is None
    other_seed = ppo.curriculum_tradable(ppo.Args(curriculum=(0.1,), total_timesteps=1_200, seed=4), 0, 143)
    assert not np.array_equal(other_seed, stages[0])  # the order is drawn from the seed
    assert ppo.curriculum_tradable(ppo.Args(), 0, 143) is None  # off by default
    assert ppo.curriculum_tradable(ppo.Args(curriculum=(0.01,), total_timesteps=10), 0, 3).sum() == 1  # at least one


def test_curriculum_run_logs_its_stages_and_bad_schedules_are_refused(workdir):
    """A run whose first half lets one symbol of 3 trade: charts/curriculum_tradable_share is 1/3, then 1; a
    falling schedule is refused with one message and exit status 2."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = workdir / "curriculum"
    run_script(PPO, workdir, *TINY, "--curriculum", "0.3", "--curriculum-span", "0.5", "--total-timesteps",
               str(4 * ITER), "--hold-bias", "-4", "--run-dir", str(out))  # fmt: skip
    acc = EventAccumulator(str(only_run(out)), size_guidance={"scalars": 0})
    acc.Reload()
    shares = [e.value for e in acc.Scalars("charts/curriculum_tradable_share")]
    assert shares == pytest.approx([1 / 3, 1 / 3, 1.0, 1.0])
    # a policy that would rather trade than hold (--hold-bias -4) trades on one symbol of 3, then on all of them
    rates = [e.value for e in acc.Scalars("trading/policy_trade_rate")]
    assert max(rates[:2]) < 0.5 * min(rates[2:])
    for bad in (["--curriculum", "0.5", "0.2"], ["--curriculum", "0.5", "--curriculum-span", "0"]):
        proc = run_script(PPO, workdir, *TINY, *bad, check=False)
        assert proc.returncode == 2 and "--curriculum" in proc.stderr and "Traceback" not in proc.stderr


def test_next_return_targets_are_the_next_bar_of_the_same_episode():
    """Step t's target is ret_1 of the window observed at t + 1 (the last step's: of the observation after the
    rollout), scaled by the valid rows' standard deviation; a step whose episode ended has no target."""
    T, E, S, L, F = 4, 2, 3, 5, 6
    technical = torch.randn(T, E, S, L, F)
    after = torch.randn(E, S, L, F)
    ended = torch.zeros(T, E, S, dtype=torch.bool)
    ended[1, 0] = True  # env 0's episode ended at step 1: row 2 is another episode's first observation
    target, valid = ppo.next_return_targets(technical, after, ended)
    raw = torch.cat([technical[1:, ..., -1, 0], after[None, ..., -1, 0]])
    scale = raw[~ended].std()
    torch.testing.assert_close(target, raw / scale)
    torch.testing.assert_close(target[-1] * scale, after[..., -1, 0])
    assert valid.sum() == T * E * S - S and not valid[1, 0].any() and valid[1, 1].all()
    earlier = technical.clone()
    earlier[:, ..., :-1, :] = 0.0  # only the newest bar of each window matters
    torch.testing.assert_close(ppo.next_return_targets(earlier, after, ended)[0], target)


def test_aux_next_return_trains_logs_and_resumes_as_uninterrupted(workdir):
    """A run with --aux-next-return logs losses/aux_next_return; its read-out travels in the run checkpoint, so a
    resumed run ends with the weights of an uninterrupted one; a negative weight is refused."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = [*TINY, "--aux-next-return", "0.5", "--encoder.cross-symbol", "attention", "--save-model", "--no-anneal-lr"]
    whole, split = workdir / "aux_whole", workdir / "aux_split"
    run_script(PPO, workdir, *flags, "--total-timesteps", str(4 * ITER), "--run-dir", str(whole))
    run_script(PPO, workdir, *flags, "--total-timesteps", str(2 * ITER), "--run-dir", str(split))
    half = only_run(split)
    run_script(PPO, workdir, *flags, "--total-timesteps", str(4 * ITER), "--resume", str(half / "checkpoint.pt"))
    a = torch.load(only_run(whole) / "checkpoint.pt", weights_only=True)
    b = torch.load(half / "checkpoint.pt", weights_only=True)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    for k, v in a["extra"]["aux_head"].items():
        torch.testing.assert_close(b["extra"]["aux_head"][k], v, rtol=0, atol=0, msg=k)
    acc = EventAccumulator(str(only_run(whole)), size_guidance={"scalars": 0})
    acc.Reload()
    losses = [e.value for e in acc.Scalars("losses/aux_next_return")]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)
    proc = run_script(PPO, workdir, *TINY, "--aux-next-return", "-1", check=False)
    assert proc.returncode == 2 and "--aux-next-return" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# --graph-from-train: the cross-symbol block's graph fitted in closed form on the training bars
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kappa", [0.45, 0.0])
def test_split_lagged_correlation_finds_the_hidden_leaders_and_nothing_on_the_placebo(kappa):
    """On the lead-lag market the train split's lagged correlation puts every follower's largest entry on its
    hidden leader, near the calibrated 0.345; on the placebo (kappa 0) no entry stands out."""
    from market_data import DataConfig, lead_lag_leaders, prepare_market

    market = prepare_market(DataConfig(num_symbols=6, years=2.0, signal_strength=0.0, lead_lag=kappa,
                                       sl_signals=False, cache=False))  # fmt: skip
    corr = ppo.split_lagged_correlation(market, "train").numpy()
    leaders = lead_lag_leaders(6)
    followers = np.flatnonzero(leaders != np.arange(6))
    if kappa > 0:
        assert (corr[followers].argmax(1) == leaders[followers]).all()
        assert (corr[followers, leaders[followers]] > 0.25).all()
        off = np.ones_like(corr, dtype=bool)
        off[followers, leaders[followers]] = False
        assert np.abs(corr[off]).max() < 0.08
    else:
        assert np.abs(corr).max() < 0.08


def test_graph_from_train_starts_the_block_from_the_train_correlations_and_refuses_without_a_block(workdir):
    flags = [*TINY, "--data.num-symbols", "6", "--data.signal-strength", "0", "--data.lead-lag", "0.45"]
    out = workdir / "graph_from_train"
    run_script(PPO, workdir, *flags, "--encoder.cross-symbol", "attention", "--graph-from-train", "20",
               "--save-model", "--total-timesteps", str(2 * ITER), "--run-dir", str(out))  # fmt: skip
    saved = torch.load(only_run(out) / "checkpoint.pt", weights_only=True)
    graph = saved["model"]["cross.graph"]  # (heads, S, S), after one PPO iteration at lr 2.5e-4
    from market_data import DataConfig, prepare_market

    market = prepare_market(DataConfig(num_symbols=6, years=0.5, signal_strength=0.0, lead_lag=0.45,
                                       sl_signals=False, cache=False))  # fmt: skip
    expected = 20 * ppo.split_lagged_correlation(market, "train")
    assert expected.abs().max() > 3  # the leaders stand out: a graph left at 0 would fail below
    torch.testing.assert_close(graph, expected.expand_as(graph), atol=0.05, rtol=0)
    for bad in (["--graph-from-train", "20"], ["--encoder.cross-symbol", "attention", "--graph-from-train", "-1"]):
        proc = run_script(PPO, workdir, *flags, *bad, check=False)
        assert proc.returncode == 2 and "--graph-from-train" in proc.stderr and "Traceback" not in proc.stderr
