"""--explain: integrated gradients (completeness), the saliency of a hand-set policy and of placebos, the SL vs RL
decision report against plain loops, and ppo_symbol_agent.py --eval-checkpoint --explain end to end."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_real_png, only_run, run_script  # conftest puts the repository on sys.path
from test_ppo_symbol_agent import ITER, PPO, TINY

import ppo_symbol_agent as ppo
from backtest import (
    ACTION_SIGN,
    decision_saliency,
    explain_decisions,
    format_explanation,
    integrated_gradients,
    prior_direction,
    run_backtest,
    saliency_figure,
)
from encoders import EncoderConfig, SymbolPolicy, random_observation, set_input_shapes
from market_data import FEATURE_NAMES, random_walk_market
from trading_env import EnvConfig, VecTradingCore

S = 4
RET_1 = FEATURE_NAMES.index("ret_1")


@pytest.fixture(scope="module")
def market():
    """A no-edge market (random prices, random N(0, 1) features, random sl_probs) with 169 test bars x 4 symbols."""
    m = random_walk_market(T=600, S=S, splits={"train": (30, 300), "val": (330, 400), "test": (430, 600)})
    m.feature_names = list(FEATURE_NAMES)
    return m


def make_policy(market, seed: int, shared_heads: bool = True) -> SymbolPolicy:
    """A small MLP symbol policy for `market`, randomly initialised with `seed`, in eval mode."""
    shapes = VecTradingCore(market, 1, split="test", sequential=True).observation_shapes
    torch.manual_seed(seed)
    cfg = set_input_shapes(EncoderConfig(kind="mlp", d_model=32, output_dim=32, dropout=0.0), shapes)
    return SymbolPolicy(len(market.data.symbols), cfg, shared_heads=shared_heads).eval()


def gap(attr, at_x, at_base, items: int):
    """|sum of each item's attributions - (f(x) - f(baseline))| (items,)."""
    return (attr.reshape(*at_x.shape, -1).sum(-1) - (at_x - at_base)).abs().reshape(items)


# ---------------------------------------------------------------------------------------------------------------
# integrated gradients
# ---------------------------------------------------------------------------------------------------------------
def test_integrated_gradients_completeness_on_a_random_network():
    """A smooth random network applied to each of 2 items of 8 rows ((8, 2, 4, 3) -> (8, 2)): each item's
    attributions sum to f(x) - f(baseline) within 1e-4 at 64 steps (measured 6e-6 against a mean change of 0.18),
    with a non-zero baseline, and the trapezoid's error falls as 1 / steps^2 (8 -> 32 steps: measured 16x smaller;
    a left Riemann sum gives about 4x and fails)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, base = torch.randn(8, 2, 4, 3), 0.3 * torch.randn(4, 3)

    def f(z):
        return net(z.flatten(-2)).squeeze(-1)  # (8, 2): each item reads its own (4, 3) block

    attr, at_x, at_base = integrated_gradients(f, x, base, steps=64)
    assert attr.shape == x.shape and at_x.shape == (8, 2)
    torch.testing.assert_close(at_x, f(x).detach())
    torch.testing.assert_close(at_base, f(torch.broadcast_to(base, x.shape)).detach())
    assert (at_x - at_base).abs().mean() > 0.1
    assert gap(attr, at_x, at_base, 16).max() < 1e-4
    coarse, fine = (gap(*integrated_gradients(f, x, base, steps=k), 16).max() for k in (8, 32))
    assert coarse / fine > 10


@pytest.mark.parametrize("kind", ["mlp", "transformer", "lstm", "cnn"])
def test_symbol_policy_saliency_is_complete_per_decision(kind):
    """Through a SymbolPolicy with per-symbol heads on random (3, 5) bars x symbols, every encoder: each decision's
    attributions sum to its own chosen logit's change (no mixing between symbols) within 10% of the mean change on
    average at 64 steps (measured: mlp 2.4%, transformer 0.3%, lstm 0.2%, cnn 1.0%); for the MLP, whose ReLU kinks
    dominate (the error falls as 1 / steps, not 1 / steps^2), 4x closer at 512 steps (measured 5.5x). A decision
    whose window is the baseline gets exactly 0, whatever its neighbours' windows hold."""
    obs = {k: v.numpy() for k, v in random_observation(3, 5, seed=1).items()}
    obs["technical"][1, 2] = 0.0  # this decision's window is the baseline: nothing to attribute
    small = {"d_model": 32, "output_dim": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 32, "dropout": 0.0}
    cfg = set_input_shapes(EncoderConfig(kind=kind, **small), {k: v.shape[2:] for k, v in obs.items()})
    torch.manual_seed(0)
    policy = SymbolPolicy(5, cfg, shared_heads=False).eval()
    attr, action, at_x, at_base = decision_saliency(policy.get_logits, obs, "cpu", steps=64, windows=5)
    assert attr.shape == (3, 5, 24, 23) and action.shape == (3, 5)
    with torch.no_grad():
        logits = policy.get_logits({k: torch.as_tensor(v) for k, v in obs.items()})
    np.testing.assert_array_equal(action, logits.argmax(-1).numpy())
    np.testing.assert_allclose(at_x, logits.gather(-1, torch.as_tensor(action)[..., None])[..., 0], rtol=1e-5)
    err = np.abs(attr.sum((-2, -1)) - (at_x - at_base))
    change = np.abs(at_x - at_base).mean()
    assert err.mean() < 0.1 * change and np.abs(attr[1, 2]).max() == 0.0
    if kind != "mlp":
        return
    fine, _, fine_x, fine_base = decision_saliency(policy.get_logits, obs, "cpu", steps=512)
    assert np.abs(fine.sum((-2, -1)) - (fine_x - fine_base)).mean() < err.mean() / 4


# ---------------------------------------------------------------------------------------------------------------
# saliency: a checkable policy and placebos
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("others", [0.0, 0.02])
def test_a_policy_that_reads_ret_1_at_the_last_bar_is_seen_to(market, others):
    """The encoder's first layer set by hand: ret_1 at the decision bar read with weights spread over [-1, 1], every
    other technical input at `others` x its random initial weight (the state inputs as initialised). The largest
    aggregated attribution falls on (lag 0, ret_1): all of it when nothing else is read (measured 100%), and 10x the
    next cell when every other input is read a little (measured 28.4% against 0.36%, 79x)."""
    policy = make_policy(market, seed=0)
    L, F = policy.encoder.cfg.seq_len, policy.encoder.cfg.technical_dim
    with torch.no_grad():
        w = policy.encoder.net[0].weight  # (d_model, L * F + states): the window flattened bar by bar
        w[:, : L * F] *= others
        w[:, (L - 1) * F + RET_1] = torch.linspace(-1.0, 1.0, w.shape[0])
    explained = explain_decisions(policy.get_logits, market, "test", EnvConfig(), seed=1)
    share = explained["share"]
    assert share.shape == (L, F) and share.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(share.argmax(), share.shape) == (L - 1, RET_1)
    second = np.sort(share, axis=None)[-2]
    if others == 0.0:
        assert share[L - 1, RET_1] > 0.999 and second == 0.0
    else:
        assert share[L - 1, RET_1] > 10 * second
    text = format_explanation(explained)
    assert f"Share on ret_1 at the decision bar (lag 0): {share[L - 1, RET_1]:.1%}." in text
    assert "| 1 | 0 | ret_1 |" in text and f"{explained['decisions']} with a choice" in text
    assert explained["decisions"] == 676 and explained["bars"] == 169  # every test bar (2048 > 169 x 4)


@pytest.mark.parametrize("seed, shared_heads", [(0, True), (1, True), (2, False)])
def test_placebo_networks_spread_their_attribution(market, seed, shared_heads):
    """Randomly initialised policies on the no-edge market read nothing in particular: no (lag, feature) cell holds
    more than 1% of the total (5.5x the uniform 1 / 552; measured 0.31-0.43% over 8 networks on 676 decisions, so
    the bound leaves room for other seeds and still fails a map that concentrates, as the hand-set policy's 28%)."""
    explained = explain_decisions(make_policy(market, seed, shared_heads).get_logits, market, "test", EnvConfig(), 1)
    assert explained["share"].max() < 0.01
    assert_real_png_figure(saliency_figure(explained, "placebo"))


def assert_real_png_figure(fig):
    """The figure saved as a PNG (as experiment.save_figures does, dpi 100) is a real picture with the feature names."""
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == list(FEATURE_NAMES)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "saliency.png"
        fig.savefig(path, dpi=100)
        assert_real_png(path, min_width=1000, min_height=600)


def test_a_smaller_sample_is_drawn_by_bar_and_seeded(market):
    """decisions < bars x S: ceil(decisions / S) whole bars, the same ones for the same seed."""
    policy = make_policy(market, seed=0)
    a, b = (explain_decisions(policy.get_logits, market, "test", EnvConfig(), 3, decisions=40) for _ in range(2))
    assert a["bars"] == 10 and a["decisions"] <= 40
    np.testing.assert_array_equal(a["saliency"], b["saliency"])


# ---------------------------------------------------------------------------------------------------------------
# SL vs RL
# ---------------------------------------------------------------------------------------------------------------
def test_action_sign_is_the_priors_direction():
    np.testing.assert_array_equal(ACTION_SIGN, ppo.ACTION_DIRECTION)


def test_prior_direction_is_the_priors_most_likely_action():
    """prior_direction against a plain loop over the training script's own prior (sl_prior_logprobs), ties included
    (mean probability exactly 1/2: every allowed action ties and HOLD, action 0, is the argmax)."""
    rng = np.random.default_rng(0)
    sl = rng.uniform(size=(200, 3)).astype(np.float32)
    sl[::5] = 0.5
    mask = rng.random((200, 7)) < 0.5
    mask[:, 0] = True
    fast = prior_direction(sl.mean(-1), mask)
    for i in range(200):
        logp = ppo.sl_prior_logprobs(torch.as_tensor(sl[i]), torch.as_tensor(mask[i]), temperature=4.0)
        assert fast[i] == ppo.ACTION_DIRECTION[int(logp.argmax())], i


def test_the_decision_report_against_plain_loops(market):
    """The sweep's decisions are the argmax backtest's (same total return); the forward return and next-bar PnL of
    each decision, and the agreement table and group means, recomputed decision by decision."""
    policy = make_policy(market, seed=0)
    config = EnvConfig()
    explained = explain_decisions(policy.get_logits, market, "test", config, seed=1)
    rec, sl = explained["sweep"], explained["sl"]

    def argmax(obs):
        with torch.no_grad():
            return policy.get_logits({k: torch.as_tensor(v) for k, v in obs.items()}).argmax(-1).numpy()

    reference = run_backtest(argmax, market, "test", config, seed=1)
    assert explained["total_return"] == reference["agent"]["total_return"]
    n, start = len(rec["action"]), rec["start"]
    px, pnl = market.data.open, reference["series"]["pnl"]
    rows = {"agree": [], "disagree": []}
    table = {a: {p: 0 for p in ("buy", "hold", "sell")} for a in ("buy", "hold", "sell")}
    name = {1: "buy", 0: "hold", -1: "sell"}
    for i in range(n):
        for s in range(S):
            t = start + i
            fwd = px[t + 2, s] / px[t + 1, s] - 1.0 if i < n - 1 else np.nan
            nxt = pnl[i + 1, s] / config.initial_capital if i < n - 1 else np.nan
            np.testing.assert_allclose([rec["fwd"][i, s], rec["pnl_next"][i, s]], [fwd, nxt], rtol=1e-12)
            mask = rec["mask"][i, s]
            if mask.sum() < 2:
                continue
            agent = ppo.ACTION_DIRECTION[rec["action"][i, s]]
            logp = ppo.sl_prior_logprobs(torch.as_tensor(market.sl_probs[t, s]), torch.as_tensor(mask), 4.0)
            prior = ppo.ACTION_DIRECTION[int(logp.argmax())]
            table[name[agent]][name[prior]] += 1
            rows["agree" if agent == prior else "disagree"].append((fwd, agent * fwd, nxt))
    assert sl["table"] == table and sl["decisions"] == sum(map(len, rows.values())) == explained["decisions"]
    assert 0.2 < sl["agreement"] < 0.8 and sl["agreement"] == pytest.approx(len(rows["agree"]) / sl["decisions"])
    for group, values in rows.items():
        fwd, signed, nxt = (np.array(v) for v in zip(*values, strict=True))
        got = sl["groups"][group]
        assert got["n"] == len(values)
        ok = np.isfinite(fwd)
        np.testing.assert_allclose([got["fwd_bp"], got["signed_bp"], got["pnl_bp"]],
                                   [1e4 * fwd[ok].mean(), 1e4 * signed[ok].mean(), 1e4 * nxt[ok].mean()])  # fmt: skip
        assert got["signed_se_bp"] == pytest.approx(1e4 * signed[ok].std(ddof=1) / np.sqrt(ok.sum()))
    text = format_explanation(explained)
    assert f"They agree on {sl['agreement']:.1%} of the decisions." in text and "| agree |" in text


def test_without_supervised_signals_the_report_says_so(market):
    """Constant sl_probs (as --data.no-sl-signals gives): no comparison and a sentence that says why, no crash."""
    flat = random_walk_market(T=600, S=S, splits={"train": (30, 300), "val": (330, 400), "test": (430, 600)})
    flat.sl_probs[:] = 0.5
    explained = explain_decisions(make_policy(flat, seed=0).get_logits, flat, "test", EnvConfig(), 1, decisions=64)
    assert explained["sl"] is None and explained["sl_constant"] == 0.5
    text = format_explanation(explained)
    assert "No comparison: sl_probs is constant (0.5)" in text and "--data.no-sl-signals" in text
    assert "Share on ret_1" not in text and "By feature (summed over the lags): feature " in text  # no names


# ---------------------------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------------------------
def test_explain_flag_end_to_end(tmp_path):
    """A tiny run with --save-model, then --eval-checkpoint ... --explain writes the saliency picture, explain.md
    and explain.json beside the report; the explained sweep is the report's argmax agent."""
    run_script(PPO, tmp_path, *TINY, "--total-timesteps", str(2 * ITER), "--save-model", "--no-stress")
    trained = only_run(tmp_path / "runs")
    cwd = tmp_path / "eval"
    cwd.mkdir()
    proc = run_script(PPO, cwd, *TINY, "--eval-checkpoint", str(trained / "best.pt"), "--explain", "--no-stress",
                      "--eval-samples", "0")  # fmt: skip
    run = only_run(cwd / "runs")
    assert_real_png(run / "test_saliency.png", min_width=1000, min_height=600)
    report = (run / "explain.md").read_text()
    assert "## Saliency" in report and "64 trapezoid steps" in report and "zero baseline" in report
    assert "Share on ret_1 at the decision bar (lag 0):" in report and "| rank | lag" in report
    assert "No comparison: sl_probs is constant" in report  # TINY prepares no supervised signals
    assert "## Saliency" in proc.stdout
    explained = json.loads((run / "explain.json").read_text())
    backtest = json.loads((run / "backtest.json").read_text())
    assert explained["total_return"] == backtest["agent"]["total_return"]
    assert explained["decisions"] > 0 and np.sum(explained["share"]) == pytest.approx(1.0, abs=1e-5)
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"


def test_explain_without_a_checkpoint_is_refused(tmp_path):
    proc = run_script(PPO, tmp_path, *TINY, "--explain", check=False)
    assert proc.returncode == 2 and "--explain" in proc.stderr and "--eval-checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
