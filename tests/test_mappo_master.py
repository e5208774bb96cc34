"""mappo_master.py: value normalisation, master reward, the centralised critic's input, loading a ppo_symbol_agent.py
checkpoint into the symbol agents, and the script itself run as a subprocess with tiny settings.

The directive semantics (risk multiplier scales sizes, position cap and open-position limit mask and cancel orders,
regime mode sets the exposure ceiling and masks) are tested on the core in tests/test_trading_env.py
(test_risk_multiplier_scales_buy_size, test_position_cap_masks_buys_and_adds, ...); here the MAPPO-level question is
whether the symbol agents can read the directive at all. The PettingZoo face of portfolio mode (PortfolioParallelEnv,
whose agents are MAPPO's symbol agents) passes pettingzoo's parallel_api_test in tests/test_trading_env.py."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_real_png, only_run, run_script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import mappo_master as mappo  # noqa: E402
import trading_env as te  # noqa: E402
from encoders import (  # noqa: E402
    MASKED_LOGIT,
    EncoderConfig,
    MasterNetwork,
    SymbolPolicy,
    ValueNorm,
    encoder_config_from_dict,
    random_observation,
)
from experiment import load_checkpoint, load_symbol_agents  # noqa: E402
from market_data import make_synthetic_prepared  # noqa: E402

# 3 symbols x 2 envs x 14 bars = 84 symbol-steps and 2 x 2 master decisions per iteration
COMMON = [
    "--data.num-symbols", "3", "--data.years", "0.5", "--data.no-sl-signals", "--data.no-cache", "--num-envs", "2",
    "--num-minibatches", "2", "--update-epochs", "2",
]  # fmt: skip
TINY = [*COMMON, "--eval-interval", "2", "--num-steps", "14", "--total-timesteps"]
MASTER_TAGS = [f"master_reward/{name}" for name in (*mappo.MASTER_REWARD_COMPONENTS["paired"], "total")] + [
    "losses/master_value_loss",
    "losses/master_policy_loss",
    "losses/master_entropy",
    "losses/master_explained_variance",
    "charts/value_norm_mean",
    "charts/value_norm_std",
    "master/directive_risk_level",
    "master/entropy_risk",
    "master/ent_coef_mode",
    "losses/value_loss",
    "charts/policy_action_entropy_mean",
    "charts/SPS",
    "reward/pnl",
    "trading/val_max_drawdown",
    "trading/drawdown_cut_vs_matched_best_constant",
    "equity/test_master",
    "equity/test_neutral",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny ppo_symbol_agent.py run that saves its checkpoint, then a tiny MAPPO run initialised from it (both in
    one folder, so the second reads the first's market cache)."""
    cwd = tmp_path_factory.mktemp("mappo")
    ppo_flags = [*COMMON, "--num-steps", "8", "--total-timesteps", "48", "--eval-interval", "0", "--save-model"]
    ppo_flags += ["--no-shared-heads"]  # per-symbol heads: the universe check below needs them
    run_script("ppo_symbol_agent.py", cwd, *ppo_flags, "--run-dir", "ppo")
    ckpt = only_run(cwd / "ppo") / "checkpoint.pt"
    flags = [*TINY, "168", "--symbol-checkpoint", str(ckpt), "--save-model"]
    proc = run_script("mappo_master.py", cwd, *flags)
    return proc, only_run(cwd / "runs"), ckpt


# ---------------------------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------------------------
def test_summary_backtest_and_go_criterion(runs):
    proc, run, ckpt = runs
    assert f"encoder preset from {ckpt}" in proc.stdout
    assert "backtest on the test split" in proc.stdout and "go criterion" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 2 * 84
    keys = ("master_anchor", "master_heads", "master_inputs", "master_norm", "master_risk_levels")
    auto = {k: summary["args"][k] for k in keys}  # agents still train
    assert auto == {"master_anchor": "neutral", "master_heads": "all", "master_inputs": "full", "master_norm": "off",
                    "master_risk_levels": "all"}  # fmt: skip
    backtest = summary["backtest"]
    names = {"master", "best_constant", "neutral", "vol_target", "corr_rule", "reactive_rule", "defensive",
             "best_constant_matched", "neutral_matched", "benchmark_bh", "equal_weight_bh"}  # fmt: skip
    assert set(backtest) == names  # no oracle: this market has no hidden edge state
    for key in ("total_return", "sharpe", "sortino", "max_drawdown", "calmar", "exposure"):
        assert all(key in backtest[name] for name in names), key
    for key in ("turnover", "trades", "costs"):
        assert key in backtest["master"] and key in backtest["best_constant"]
    # the exposure-matched books hold the master's exposure: de-leveraging alone is not skill
    assert backtest["best_constant_matched"]["exposure"] == pytest.approx(backtest["master"]["exposure"])
    go = summary["go_criterion"]
    dd_m, dd_x = abs(backtest["master"]["max_drawdown"]), abs(backtest["best_constant_matched"]["max_drawdown"])
    assert go["drawdown_cut_vs_matched_best_constant"] == pytest.approx(1 - dd_m / dd_x if dd_x > 0 else 0.0)
    baselines = ("best_constant", "vol_target", "corr_rule", "reactive_rule")
    sharpe_ok = all(backtest["master"]["sharpe"] >= backtest[k]["sharpe"] for k in baselines)
    assert go["go"] == (go["drawdown_cut_vs_matched_best_constant"] >= 0.15 and sharpe_ok)
    assert go["oracle_gain"] is None and "margin_vs_best_constant" in go
    fitted = json.loads((run / "master_baselines.json").read_text())
    assert {"fixed", "corr_rule", "reactive_rule", "vol_target"} <= set(fitted) and fitted["split"] == "train"
    report = (run / "backtest.md").read_text()
    assert report.startswith("The master's Sharpe on the test split is") and "\n| test | master |" in report
    assert [row["scenario"] for row in summary["stress"]][:5] == [
        "costs_x2", "costs_x3", "impact_x5", "latency_1_bar", "crisis_replay"
    ]  # fmt: skip
    assert all("master" in row["reports"] and "vol_target" in row["reports"] for row in summary["stress"])
    assert (run / "checkpoint.pt").is_file()
    for name in ("equity", "drawdown", "actions", "contribution", "directives"):
        assert_real_png(run / f"test_{name}.png")


def test_a_saved_master_is_evaluated_without_training(runs):
    _, run, ckpt = runs
    cwd = run.parent.parent / "eval"
    cwd.mkdir()
    proc = run_script("mappo_master.py", cwd, *TINY, "168", "--eval-checkpoint", str(run / "checkpoint.pt"))
    evaluated = only_run(cwd / "runs")
    summary = json.loads((evaluated / "summary.json").read_text())
    assert evaluated.name.endswith("__eval") and "iter " not in proc.stdout  # no training
    original = json.loads((run / "summary.json").read_text())
    assert summary["backtest"]["master"] == original["backtest"]["master"]  # same weights, same market, same result
    other = run_script("mappo_master.py", cwd, *TINY, "168", "--data.num-symbols", "4", "--eval-checkpoint",
                       str(run / "checkpoint.pt"), check=False)  # fmt: skip
    assert other.returncode == 2 and "another universe" in other.stderr and "Traceback" not in other.stderr
    wrong = run_script("mappo_master.py", cwd, *TINY, "168", "--eval-checkpoint", str(ckpt), check=False)  # PPO's
    assert wrong.returncode == 2 and "not a checkpoint of mappo_master.py" in wrong.stderr
    moved = run_script("mappo_master.py", cwd, *TINY, "168", "--data.num-symbols", "4", "--symbol-checkpoint",
                       str(ckpt), check=False)  # fmt: skip
    assert moved.returncode == 2 and "another universe" in moved.stderr and "Traceback" not in moved.stderr


def test_tensorboard_event_file_has_master_reward_components(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = runs
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    missing = [t for t in MASTER_TAGS if t not in tags]
    assert not missing, f"missing tags {missing}; logged: {sorted(tags)}"
    assert [e.step for e in events.Scalars("master_reward/total")] == [84, 168]
    for name in mappo.MASTER_REWARD_COMPONENTS["paired"]:
        assert all(math.isfinite(e.value) for e in events.Scalars(f"master_reward/{name}"))
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]


def test_ppo_checkpoint_loads_into_symbol_agents(runs):
    """The loaded agents equal the PPO policy on any observation: the directive rows start at zero weight."""
    _, _, ckpt = runs
    agent, encoder = load_symbol_agents(str(ckpt), 3)
    payload = load_checkpoint(ckpt)
    ppo_agent = SymbolPolicy(3, encoder_config_from_dict(payload["args"]["encoder"]))
    load_checkpoint(ckpt, ppo_agent)
    assert agent.directive_dim == 4 and encoder.kind == payload["args"]["encoder"]["kind"]
    core = te.VecTradingCore(make_synthetic_prepared(num_symbols=3, years=0.5), 2, mode="portfolio", seed=0)
    obs = core.reset(seed=0)
    core.set_directives(np.array([0, te.NUM_DIRECTIVES - 1]))  # two very different directives
    with torch.no_grad():
        got = agent.get_logits(mappo.to_torch(obs, "cpu"))
        want = ppo_agent.get_logits(mappo.to_torch({k: v for k, v in obs.items() if k != "directives"}, "cpu"))
    torch.testing.assert_close(got, want)
    # the MAPPO checkpoint holds both levels and the value normaliser
    saved = torch.load(next(ckpt.parent.parent.parent.glob("runs/*/checkpoint.pt")), weights_only=True)["model"]
    assert {k.split(".")[0] for k in saved} == {"symbols", "master", "value_norm"}
    with pytest.raises(ValueError, match="3 symbols but the data has 5"):
        load_symbol_agents(str(ckpt), 5)


def test_symbol_agents_read_the_directive():
    """Once the directive rows have weight, two directives give the same symbols different action distributions."""
    core = te.VecTradingCore(make_synthetic_prepared(num_symbols=3, years=0.5), 2, mode="portfolio", seed=0)
    obs = core.reset(seed=0)
    torch.manual_seed(0)
    agent = SymbolPolicy(3, EncoderConfig(kind="mlp", d_model=32, output_dim=32, dropout=0.0), directive_dim=4)
    core.set_directives(np.array([te.NEUTRAL_DIRECTIVE, te.NEUTRAL_DIRECTIVE]))
    with torch.no_grad():
        same = agent.get_logits(mappo.to_torch(obs, "cpu"))
        core.set_directives(np.array([te.NEUTRAL_DIRECTIVE, 0]))
        changed = agent.get_logits(mappo.to_torch(obs, "cpu"))
    torch.testing.assert_close(changed[0], same[0])
    assert not torch.allclose(changed[1], same[1])


def test_resume_equals_uninterrupted(runs):
    _, run, ckpt = runs
    cwd = run.parent.parent / "split"
    cwd.mkdir()
    extra = ["--symbol-checkpoint", str(ckpt), "--save-model"]
    run_script("mappo_master.py", cwd, *TINY, "84", *extra)  # one iteration of the fixture's two
    half = only_run(cwd / "runs")
    run_script("mappo_master.py", cwd, *TINY, "168", *extra, "--resume", str(half / "checkpoint.pt"))
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(half / "checkpoint.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 168
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (run, half))
    assert sa["backtest"]["master"] == sb["backtest"]["master"]


def test_torchrun_two_processes(tmp_path):
    flags = [*TINY, "168", "--eval-interval", "0"]
    proc = run_script(
        "mappo_master.py", tmp_path, *flags, launcher=["torchrun", "--standalone", "--nproc_per_node", "2"]
    )
    summary = json.loads((only_run(tmp_path / "runs") / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["args"]["world_size"] == 2
    assert summary["global_step"] == 168  # two ranks, one iteration each
    assert proc.stdout.count("final backtest on the test split") == 1  # rank 0 alone reports


def test_frozen_master_anchored_on_the_best_constant(runs, tmp_path):
    """--master-anchor best_constant --master-heads risk --split val (so the auto inputs are market, standardised, and
    the risk head picks flat or the anchor's level): the best
    fixed directive is fitted before training on the split the master trains on (the shadow trades it), the run
    completes with argmax frozen symbol agents on the edge-regime market, every directive of its test backtest has the
    best constant's concentration level and regime mode, the oracle is reported, and the saved master (market inputs
    only, no symbol embeddings; standardised; one hidden layer of 16) evaluates to the same backtest without those
    flags; without frozen agents the anchor is refused before any work."""
    _, _, ckpt = runs
    flags = [*TINY, "84", "--symbol-checkpoint", str(ckpt), "--freeze-symbols", "--no-stress", "--data.edge-regime",
             "flip", "--master-anchor", "best_constant", "--master-heads", "risk", "--split", "val",
             "--eval-split", "train", "--save-model", "--master-actor-hidden", "16"]  # fmt: skip
    proc = run_script("mappo_master.py", tmp_path, *flags)
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    resolved = [summary["args"][k] for k in ("master_inputs", "master_norm", "master_risk_levels")]
    assert resolved == ["market", "on", "flat_or_anchor"]  # auto, anchored on the best constant
    weights = load_checkpoint(run / "checkpoint.pt")["model"]
    assert weights["master.actor.0.weight"].shape == (16, 26) and weights["master.actor.2.weight"].shape == (12, 16)
    assert (weights["master.input_shift"][:13] != 0).all()  # standardised over --split, saved with the weights
    assert weights["master.allowed"][:5].sum() <= 2  # the risk head: flat or the anchor's level
    (tmp_path / "eval").mkdir()
    eval_flags = [
        *TINY,
        "84",
        "--no-stress",
        "--data.edge-regime",
        "flip",
        "--eval-checkpoint",
        str(run / "checkpoint.pt"),
    ]
    run_script("mappo_master.py", tmp_path / "eval", *eval_flags)  # the saved inputs, layers and standardisation
    evaluated = json.loads((only_run(tmp_path / "eval" / "runs") / "summary.json").read_text())
    assert evaluated["backtest"]["master"] == summary["backtest"]["master"]
    assert "oracle" in summary["backtest"] and summary["go_criterion"]["oracle_gain"] is not None
    assert "p_defensive_given_R" in summary["directive_analysis"]
    baselines = json.loads((only_run(tmp_path / "runs") / "master_baselines.json").read_text())
    fixed = baselines["fixed"]
    assert baselines["split"] == fixed["split"] == "val"  # fitted where the master trained, not on train
    _, level, mode = np.unravel_index(fixed["best"], te.DIRECTIVE_SHAPE)
    master = summary["backtest"]["master"]  # the mean coordinates of its directives over the test split
    assert master["directive_concentration_level"] == level and master["directive_regime_level"] == mode
    lam = summary["args"]["risk_aversion"]  # calibrated before training on the same train book the report fits
    assert lam == pytest.approx(mappo.calibrated_risk_aversion(fixed))
    earned = fixed["bar_mean"][fixed["best"]] > 0  # a tiny run's agents may lose under every directive
    assert (lam != mappo.FALLBACK_RISK_AVERSION) == earned
    assert ("calibrated on the best constant's val book" if earned else "best constant directive lost") in proc.stdout
    (tmp_path / "x").mkdir()
    refused = run_script(
        "mappo_master.py", tmp_path / "x", *TINY, "84", "--master-anchor", "best_constant", check=False
    )
    assert refused.returncode == 2 and "--freeze-symbols" in refused.stderr and "Traceback" not in refused.stderr


def test_counterfactual_master_advantage_runs_and_logs_both_sides(runs, tmp_path):
    """--master-advantage counterfactual on frozen argmax agents (the auto two-way switch on the best constant): the
    run completes, logs which side paid more and what the drawn side gave up (tensorboard, read back), and saves the
    resolved flag; with all five risk levels it is refused before any run folder, exit 2 and no traceback."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, ckpt = runs
    flags = [*TINY, "84", "--symbol-checkpoint", str(ckpt), "--freeze-symbols", "--no-stress", "--data.edge-regime",
             "flip", "--split", "val", "--eval-split", "train", "--master-advantage", "counterfactual"]  # fmt: skip
    run_script("mappo_master.py", tmp_path, *flags)
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["args"]["master_advantage"] == "counterfactual"
    assert summary["args"]["master_risk_levels"] == "flat_or_anchor"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    share = [e.value for e in events.Scalars("master/counterfactual_flat_share")]
    regret = [e.value for e in events.Scalars("master/counterfactual_regret")]
    assert len(share) == len(regret) == 1 and 0.0 <= share[0] <= 1.0 and regret[0] >= 0.0
    assert all(math.isfinite(e.value) for e in events.Scalars("losses/master_policy_loss"))
    (tmp_path / "x").mkdir()
    refused = run_script("mappo_master.py", tmp_path / "x", *flags, "--master-risk-levels", "all", check=False)
    assert refused.returncode == 2 and "flat_or_anchor" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "x" / "runs").exists()


def test_bad_master_interval_fails_before_any_run_folder(tmp_path):
    proc = run_script("mappo_master.py", tmp_path, *COMMON, "--num-steps", "10", check=False)
    assert proc.returncode != 0 and "--master-interval" in proc.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------------------------------
def test_centralised_critic_receives_the_global_state():
    market = make_synthetic_prepared(num_symbols=3, years=0.5)
    core = te.VecTradingCore(market, 2, mode="portfolio", seed=0)
    obs = core.reset(seed=0)
    for _ in range(5):  # open some positions so that the state's per-symbol part is not all zeros
        obs, *_ = core.step(np.where(obs["action_mask"][..., te.BUY_SMALL] == 1, te.BUY_SMALL, te.HOLD))
    agent = SymbolPolicy(3, EncoderConfig(kind="mlp", d_model=32, output_dim=32, dropout=0.0), directive_dim=4)
    last = np.zeros((2, 3), np.int64)
    glob = mappo.global_features(obs, core.directive_index, last, mappo.market_state(market)[core.t], np.zeros(2))
    emb, glob, state = mappo.master_inputs(agent, obs, glob, core.state(), "cpu")
    np.testing.assert_array_equal(state.numpy(), core.state())
    assert state.shape == (2, core.state_dim) and glob.shape == (2, 41) and emb.shape == (2, 3, 32)
    # the global state of a copied observation (as for info["final_obs"]) is the env's own state()
    copy = {k: v.copy() for k, v in obs.items()}
    np.testing.assert_array_equal(core.state(copy), core.state())
    master = MasterNetwork(32, 41, state_dim=core.state_dim)
    logits, value = master(emb, glob, state)
    other = state.clone()
    other[:, -1] += 1.0  # one symbol's unrealised PnL
    logits2, value2 = master(emb, glob, other)
    torch.testing.assert_close(logits2, logits)  # the actor never sees the state
    assert not torch.allclose(value2, value)  # the critic does


def test_input_norm_standardises_the_market_state_and_loads_into_the_master():
    """--master-norm on: the market-state columns of the actor's global features enter as z-scores over the training
    split's bars, the book's return in units of its typical interval return, the one-hot directive as it is; the
    master applies the saved (shift, scale) itself, and weights saved before the standardisation load as the
    identity. --master-actor-hidden with no sizes makes the actor linear."""
    rng = np.random.default_rng(0)
    states = rng.normal(3.0, 2.0, size=(100, 13)).astype(np.float32)
    states[:, 5] = 7.0  # a constant column keeps its scale
    rows = (20, 80)
    shift, scale = mappo.input_norm(states, rows, "market", 26, recent_sd=0.01)
    np.testing.assert_allclose(shift[:13], states[20:80].mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.delete(scale[:13], 5), np.delete(states[20:80].std(0), 5), rtol=1e-5)
    assert scale[5] == 1.0 and scale[13] == 0.01 and shift[13] == 0.0
    assert (shift[14:] == 0).all() and (scale[14:] == 1).all()  # the one-hot directive
    cross_shift, cross_scale = mappo.input_norm(states, rows, "cross", 16, recent_sd=0.01)
    np.testing.assert_allclose(cross_shift[:3], shift[10:13])
    np.testing.assert_allclose(cross_scale[:3], scale[10:13])
    assert cross_scale[3] == 0.01 and (cross_scale[4:] == 1).all()  # --master-inputs cross: the last 3 columns only
    full_shift, full_scale = mappo.input_norm(states, rows, "full", 41, recent_sd=0.0)
    np.testing.assert_array_equal(full_shift[8:21], shift[:13])  # after the 8 portfolio features
    assert full_scale[21] == 1.0 and (full_scale[:8] == 1).all()  # a book that never trades: its return as it is
    master = MasterNetwork(0, 26, actor_hidden=())
    assert [m.weight.shape for m in master.actor if isinstance(m, torch.nn.Linear)] == [(12, 26)]  # linear
    glob = torch.as_tensor(rng.normal(size=(4, 26)).astype(np.float32))
    emb = torch.zeros(4, 3, 0)
    before = master(emb, (glob - torch.as_tensor(shift)) / torch.as_tensor(scale))[0]
    master.set_input_norm(shift, scale)
    torch.testing.assert_close(master(emb, glob)[0], before)
    saved = {k: v for k, v in master.state_dict().items() if not k.startswith("input_")}
    fresh = MasterNetwork(0, 26, actor_hidden=())
    fresh.load_state_dict(saved)  # an old checkpoint: no standardisation buffers
    assert (fresh.input_shift == 0).all() and (fresh.input_scale == 1).all()
    with pytest.raises(ValueError, match="positive"):
        fresh.set_input_norm(shift, np.zeros(26))


def test_flat_or_anchor_risk_levels_leave_the_risk_head_two_choices():
    """--master-risk-levels flat_or_anchor: with the other heads pinned to the anchor, the master's directives are
    the anchor itself or the anchor at risk 0 (flat), and the joint distribution still sums to one."""
    anchor = int(np.ravel_multi_index((3, 1, 2), te.DIRECTIVE_SHAPE))
    master = MasterNetwork(0, 5, actor_gain=1.0)
    master.pin_heads(anchor, heads=(1, 2))
    master.restrict_head(0, {0, 3})
    logits, _ = master(torch.zeros(64, 2, 0), torch.randn(64, 5))
    probs = logits.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    flat = int(np.ravel_multi_index((0, 1, 2), te.DIRECTIVE_SHAPE))
    assert set(torch.nonzero(probs.sum(0) > 1e-6).flatten().tolist()) == {flat, anchor}
    assert master.free_heads() == [True, False, False]
    master.restrict_head(0, {3})
    assert master.free_heads() == [False, False, False]


def test_all_action_loss_moves_each_decision_toward_the_side_that_paid():
    """--master-advantage counterfactual: the other side of a two-way switch is the one allowed directive not chosen;
    the all-action loss's gradient does not depend on a per-decision baseline (a constant added to both sides), and
    descending it raises, on every decision, the probability of the side whose interval paid more, whichever side was
    drawn."""
    flat, anchor = (int(np.ravel_multi_index((r, 1, 2), te.DIRECTIVE_SHAPE)) for r in (0, 3))
    z = torch.full((4, te.NUM_DIRECTIVES), MASKED_LOGIT)
    z[:, [flat, anchor]] = 0.0
    chosen = torch.tensor([flat, anchor, flat, anchor])
    alt = mappo.other_side(z, chosen)
    assert alt.tolist() == [anchor, flat, anchor, flat]
    reward_flat, reward_anchor = torch.tensor([1.0, -1.0, 0.2, 3.0]), torch.tensor([0.0, 0.5, -0.4, 2.0])
    r_chosen = torch.where(chosen == flat, reward_flat, reward_anchor)
    r_alt = torch.where(chosen == flat, reward_anchor, reward_flat)

    def grad(shift):
        logits = z.clone().requires_grad_(True)
        mappo.all_action_loss(logits, chosen, r_chosen + shift, alt, r_alt + shift, 1.0).backward()
        return logits.grad

    torch.testing.assert_close(grad(torch.zeros(4)), grad(torch.tensor([5.0, -3.0, 100.0, 0.5])))
    logits = z.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([logits], lr=1.0)
    for _ in range(20):
        optimiser.zero_grad()
        mappo.all_action_loss(logits, chosen, r_chosen, alt, r_alt, 1.0).backward()
        optimiser.step()
    p_flat = torch.softmax(logits.detach(), -1)[:, flat]
    assert ((p_flat > 0.5) == (reward_flat > reward_anchor)).all() and (abs(p_flat - 0.5) > 0.1).all()
    only_flat = torch.full((1, te.NUM_DIRECTIVES), MASKED_LOGIT)
    only_flat[0, flat] = 0.0
    assert mappo.other_side(only_flat, torch.tensor([flat])).tolist() == [flat]  # an anchor that is already flat
    with pytest.raises(ValueError, match="at most two allowed"):
        mappo.other_side(torch.zeros(1, te.NUM_DIRECTIVES), torch.tensor([0]))


def test_counterfactual_rewards_play_each_side_out_and_leave_the_account_alone():
    """counterfactual_rewards: each side is played out on a twin from the account's state, its first interval on
    that side and the next on the anchor, the argmax agents acting on the twin's observations; the result equals the
    discounted paired utility and drawdown penalty computed by hand (the shadow's terms left out), the anchor's side
    equals the account's own future, flat differs, and the account itself has not moved."""
    market = make_synthetic_prepared(num_symbols=3, years=0.5)
    flat, anchor = (int(np.ravel_multi_index((r, 1, 2), te.DIRECTIVE_SHAPE)) for r in (0, 3))
    agent = SymbolPolicy(3, EncoderConfig(kind="mlp", d_model=16, output_dim=16, dropout=0.0), directive_dim=4)
    args = mappo.Args(master_interval=7, master_cf_horizon=2, master_gamma=0.8, risk_aversion=50.0)
    account, *twins = (te.VecTradingCore(market, 2, mode="portfolio", seed=0) for _ in range(3))
    account.reset(seed=0)
    account.set_directives(np.full(2, anchor))
    for _ in range(30):  # a book to start from
        account.step(mappo.symbol_actions(agent, account.obs, "cpu", True))
    before, last_dd = account.get_state(), np.full(2, 0.06)  # the drawdown at the last bar, beyond the threshold
    played = mappo.counterfactual_rewards(account, twins, (np.full(2, anchor), np.full(2, flat)), anchor, agent,
                                          "cpu", args, last_dd, market.data.benchmark)  # fmt: skip
    after = account.get_state()
    assert all(np.array_equal(before[k], after[k]) for k in before if isinstance(before[k], np.ndarray))

    def by_hand(first):
        core = te.VecTradingCore(market, 2, mode="portfolio", seed=0)
        core.set_state(before)
        total, dd_prev = np.zeros(2), last_dd
        for h in range(2):
            core.set_directives(np.full(2, first if h == 0 else anchor))
            utility, dd_up = np.zeros(2), np.zeros(2)
            for _ in range(7):
                _, _, _, _, info = core.step(mappo.symbol_actions(agent, core.obs, "cpu", True))
                r, dd = info["account_return"][:, 0], info["drawdown"][:, 0]
                utility += r - 25.0 * r * r
                dd_up += np.maximum(np.maximum(dd - 0.05, 0) - np.maximum(dd_prev - 0.05, 0), 0)
                dd_prev = dd
            total += 0.8**h * (100 * utility - 2.0 * 100 * dd_up)
        return total

    np.testing.assert_allclose(played[0], by_hand(anchor), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(played[1], by_hand(flat), rtol=1e-9, atol=1e-12)
    assert not np.allclose(played[0], played[1])  # flat buys nothing new for a day: another book


def test_value_norm_tracks_running_mean_and_std():
    norm = ValueNorm()
    rng = np.random.default_rng(0)
    batches = [rng.normal(5.0, 3.0, size=n) for n in (10, 50, 7)]
    for b in batches:
        norm.update(torch.as_tensor(b, dtype=torch.float32))
    allx = np.concatenate(batches)
    assert norm.mean.item() == pytest.approx(allx.mean(), rel=1e-4)
    assert norm.var.item() == pytest.approx(allx.var(), rel=1e-3)
    x = torch.tensor([1.0, 5.0, 9.0])
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)
    assert norm.normalize(torch.tensor(allx.mean())).abs().item() < 1e-3


def test_master_reward_components_by_hand():
    args = mappo.Args(risk_coef=0.5, div_coef=0.1, dd_coef=2.0, excess_coef=0.5, master_reward="seed")
    sums = {
        "ret": np.array([0.01, -0.02]),
        "ret_sq": np.array([0.0001, 0.0004]),
        "shadow_ret": np.array([0.02, -0.01]),
        "shadow_ret_sq": np.array([0.0004, 0.0001]),
        "bench": np.array([0.005, 0.0]),
        "dd_up": np.array([0.0, 0.02]),
        "shadow_dd_up": np.array([0.01, 0.0]),
        "div": np.array([7 * 0.5, 0.0]),
        "bars": np.array([7.0, 7.0]),
    }
    parts = mappo.master_reward(sums, args, num_symbols=2)
    np.testing.assert_allclose(parts["risk_adjusted"], [100 * (0.01 - 0.5 * 0.01), 100 * (-0.02 - 0.5 * 0.02)])
    np.testing.assert_allclose(parts["diversification"], [0.1 * 0.5 / 0.5, 0.0])
    np.testing.assert_allclose(parts["drawdown"], [0.0, -2.0 * 100 * 0.02])
    np.testing.assert_allclose(parts["excess"], [0.5 * 100 * 0.005, 0.5 * 100 * -0.02])
    np.testing.assert_allclose(mappo.herfindahl_complement(np.array([[0.1, 0.1], [0.2, 0.0], [0.0, 0.0]])), [0.5, 0, 0])
    paired = mappo.master_reward(sums, mappo.Args(risk_aversion=10.0, dd_coef=2.0), num_symbols=2)
    assert set(paired) == set(mappo.MASTER_REWARD_COMPONENTS["paired"])
    utility = [(0.01 - 5 * 0.0001) - (0.02 - 5 * 0.0004), (-0.02 - 5 * 0.0004) - (-0.01 - 5 * 0.0001)]
    np.testing.assert_allclose(paired["paired_utility"], 100 * np.array(utility))
    np.testing.assert_allclose(paired["paired_drawdown"], [-2.0 * 100 * -0.01, -2.0 * 100 * 0.02])


def best_leverage(reward_args, x: np.ndarray) -> float:
    """The risk multiplier of the directive grid with the highest mean master reward on a book whose neutral bar
    returns are x (days, 7): the master's account earns L x, the shadow (neutral) account x."""
    means = []
    for lev in te.RISK_MULTIPLIERS:
        r, sh = lev * x, x
        sums = {"ret": r.sum(1), "ret_sq": (r * r).sum(1), "shadow_ret": sh.sum(1), "shadow_ret_sq": (sh * sh).sum(1),
                "dd_up": np.zeros(len(x)), "shadow_dd_up": np.zeros(len(x)), "bench": np.zeros(len(x)),
                "div": np.zeros(len(x)), "bars": np.full(len(x), 7.0)}  # fmt: skip
        means.append(sum(mappo.master_reward(sums, reward_args, 5).values()).mean())
    return te.RISK_MULTIPLIERS[int(np.argmax(means))]


def test_paired_reward_times_a_flipping_edge_and_not_a_constant_one():
    """The reward's property that makes timing learnable: on a book whose edge is the same in every state the
    reward-optimal directive is the same in every state; on a book whose edge flips sign it differs. The seed's
    reward is linear in leverage: its optimum is always a corner of the grid."""
    rng = np.random.default_rng(0)
    mu, sd = 2e-4, 1.6e-3  # per bar: a bar Sharpe of 0.125, ~5 a year over 1,764 bars
    same = {state: mu + sd * rng.standard_normal((20_000, 7)) for state in ("M", "R")}
    flip = {"M": same["M"], "R": -mu + sd * rng.standard_normal((20_000, 7))}
    paired = mappo.Args(risk_aversion=mappo.FALLBACK_RISK_AVERSION)
    seed = mappo.Args(master_reward="seed", dd_threshold=0.0)
    assert best_leverage(paired, same["M"]) == best_leverage(paired, same["R"])
    assert best_leverage(paired, flip["M"]) > best_leverage(paired, flip["R"]) == min(te.RISK_MULTIPLIERS)
    assert min(te.RISK_MULTIPLIERS) < best_leverage(paired, flip["M"])  # interior or up: exposure pays in M
    corners = (min(te.RISK_MULTIPLIERS), max(te.RISK_MULTIPLIERS))
    assert all(best_leverage(seed, x) in corners for x in (*same.values(), flip["R"], 0.5 * same["M"]))


def test_calibrated_risk_aversion_prefers_the_better_sharpe_not_the_bigger_book():
    """A fixed lambda too small for the book's scale pays for exposure: a directive that quadruples the exposure at a
    worse Sharpe ratio wins. Calibrated on the best constant's book (lambda = mu / m2), the utility is best at that
    book's own scale and ranks the two books as their Sharpe ratios do."""
    rng = np.random.default_rng(3)
    small = 1e-4 + 5e-4 * rng.standard_normal(200_000)  # low exposure, bar Sharpe 0.2
    big = 3e-4 + 2.4e-3 * rng.standard_normal(200_000)  # four times the exposure, bar Sharpe 0.125
    fixed = {"best": 0, "bar_mean": [small.mean(), big.mean()], "bar_mean_sq": [(small**2).mean(), (big**2).mean()]}
    lam = mappo.calibrated_risk_aversion(fixed)
    assert lam == pytest.approx(small.mean() / (small**2).mean())

    def utility(x, lam):  # the paired utility against a flat shadow, per bar
        sums = {"ret": x, "ret_sq": x * x, "shadow_ret": 0 * x, "shadow_ret_sq": 0 * x, "dd_up": 0 * x,
                "shadow_dd_up": 0 * x}  # fmt: skip
        return mappo.master_reward(sums, mappo.Args(risk_aversion=lam), 2)["paired_utility"].mean()

    assert utility(big, mappo.FALLBACK_RISK_AVERSION) > utility(small, mappo.FALLBACK_RISK_AVERSION)
    assert utility(small, lam) > utility(big, lam)
    scales = np.linspace(0.5, 1.5, 11)
    assert scales[np.argmax([utility(k * small, lam) for k in scales])] == pytest.approx(1.0)
    losing = {"best": 0, "bar_mean": [-1e-4], "bar_mean_sq": [1e-6]}
    assert mappo.calibrated_risk_aversion(losing) == mappo.FALLBACK_RISK_AVERSION


def test_frozen_symbol_agents_act_by_argmax():
    agent = SymbolPolicy(3, EncoderConfig(kind="mlp", d_model=16, output_dim=16, dropout=0.0), directive_dim=4)
    obs = {k: v.numpy() for k, v in random_observation(64, 3, seed=1, directives=4).items()}
    with torch.no_grad():
        logits = agent.get_logits(mappo.to_torch(obs, "cpu")).numpy()
    argmax = mappo.symbol_actions(agent, obs, "cpu", deterministic=True)
    np.testing.assert_array_equal(argmax, logits.argmax(-1))
    assert (obs["action_mask"][np.arange(64)[:, None], np.arange(3), argmax] == 1).all()  # allowed actions only
    sampled = mappo.symbol_actions(agent, obs, "cpu", deterministic=False)
    assert (sampled != argmax).any()  # near-uniform initial logits: sampling differs somewhere


def test_global_features_encode_the_directive_and_intents():
    core = te.VecTradingCore(make_synthetic_prepared(num_symbols=3, years=0.5), 2, mode="portfolio", seed=0)
    obs = core.reset(seed=0)
    core.set_directives(np.array([0, te.NUM_DIRECTIVES - 1]))
    last = np.array([[0, 0, 1], [5, 5, 5]])
    state_now = np.arange(26, dtype=np.float32).reshape(2, 13)
    g = mappo.global_features(obs, core.directive_index, last, state_now, np.array([0.01, -0.02]))
    np.testing.assert_array_equal(g[:, :8], obs["portfolio"][:, 0])
    np.testing.assert_array_equal(g[:, 8:21], state_now)  # the market state, read from the market itself
    np.testing.assert_allclose(g[:, 21], [0.01, -0.02])  # the book's recent return
    np.testing.assert_array_equal(g[0, 22:34], [1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0])  # risk 0 (flat), level 0, def.
    np.testing.assert_array_equal(g[1, 22:34], [0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1])  # risk 1.25, level 3, aggr.
    np.testing.assert_allclose(g[0, 34:], [2 / 3, 1 / 3, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(g[1, 34:], [0, 0, 0, 0, 0, 1, 0])
    market_only = mappo.global_features(obs, core.directive_index, last, state_now, np.array([0.01, -0.02]), "market")
    np.testing.assert_array_equal(market_only, g[:, 8:34])  # --master-inputs market: state, recent, directive
    state_only = mappo.global_features(obs, core.directive_index, last, state_now, np.zeros(2), "market_state")
    np.testing.assert_array_equal(state_only, np.concatenate([g[:, 8:21], g[:, 22:34]], axis=1))  # no book return
    cross = mappo.global_features(obs, core.directive_index, last, state_now, np.array([0.01, -0.02]), "cross")
    np.testing.assert_array_equal(cross, np.concatenate([g[:, 18:21], g[:, 21:34]], axis=1))  # no regime block


def test_market_state_is_the_regime_and_cross_section_and_causal():
    market = make_synthetic_prepared(num_symbols=4, years=0.5, edge_regime="flip")
    states = mappo.market_state(market)
    assert states.shape == (len(market.data.timestamps), 13) and np.isfinite(states).all()
    np.testing.assert_array_equal(states[:, :10], market.regime)


def test_recent_return_sums_the_last_bars_of_the_account():
    core = te.VecTradingCore(make_synthetic_prepared(num_symbols=3, years=0.5), 2, mode="portfolio", seed=0)
    obs = core.reset(seed=0)
    returns = []
    for _ in range(9):
        obs, _, _, _, info = core.step(np.where(obs["action_mask"][..., te.BUY_SMALL] == 1, te.BUY_SMALL, te.HOLD))
        returns.append(info["account_return"][:, 0])
    np.testing.assert_allclose(core.recent_return(7)[:, 0], np.sum(returns[-7:], axis=0))
    with pytest.raises(ValueError, match="risk_window"):
        core.recent_return(core.config.risk_window + 1)
