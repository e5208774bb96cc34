"""The learning benchmark's arms: SB3 pieces (MaskablePPO and PPO) trained and graded through the real subprocess
path on a tiny market, with the keys of a ppo piece; the SB3 policy wrapper's masks; --summary over a folder of mixed
arms; the refusals of bad flags."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, script_env

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_learning as bl  # noqa: E402
import sb3_learner  # noqa: E402

# 3 symbols x 2 envs: 6 SB3 envs; ours: 16 steps a rollout (96 symbol-steps), 10 rollouts; SB3's defaults: 2048 steps
TINY = [
    "--data.num-symbols", "3", "--data.no-sl-signals", "--data.no-cache", "--num-envs", "2", "--num-steps", "16",
    "--num-minibatches", "2", "--update-epochs", "2", "--env.episode-length", "24", "--eval-interval", "2",
    "--eval-samples", "1", "--no-stress", "--encoder.d-model", "32", "--encoder.output-dim", "32",
]  # fmt: skip
TOTAL = {"ppo": 960, "sb3_maskable_ours": 960, "sb3_ppo_default": 6 * 2048}  # whole rollouts of each


@pytest.fixture(scope="module")
def pieces_dir(tmp_path_factory):
    """A pieces folder of this module, and piece(arm): that arm's tiny piece (signal 0.3, seed 1), run once."""
    folder = tmp_path_factory.mktemp("learning")
    done = {}

    def piece(arm: str) -> dict:
        if arm not in done:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(bl, "PIECES", folder)
                mp.setattr(bl, "YEARS", 0.5)
                path = bl.run_piece(0.3, 1, [*TINY, "--total-timesteps", str(TOTAL[arm])], arm)
            assert path == (folder if arm == "ppo" else folder / arm) / "0.3_seed1.json"
            done[arm] = json.loads(path.read_text())
        return done[arm]

    return folder, piece


def assert_like_ppo(record: dict, ppo: dict, arm: str) -> None:
    """An SB3 piece has every field of a ppo piece (plus "sb3"), the same strategies and metrics in "test", and
    daily returns for each of them."""
    assert record["arm"] == arm and record["global_step"] == TOTAL[arm]
    assert set(record) == set(ppo) | {"sb3"}
    assert set(record["test"]) == set(ppo["test"]) and "agent_sampled" in record["test"]
    for name, metrics in ppo["test"].items():
        assert set(record["test"][name]) == set(metrics), name
    assert np.isfinite(record["test"]["agent"]["sharpe"]) and np.isfinite(record["test"]["rule_ceiling"]["sharpe"])
    assert set(record["daily_returns"]) == set(ppo["daily_returns"])
    assert len(record["daily_returns"]["agent"]) == len(ppo["daily_returns"]["agent"]) > 10  # the same test days
    assert record["test"]["always_hold"] == ppo["test"]["always_hold"]  # the same market, split and backtest
    assert "sb3_learner.py" in record["command"] and "--algo" in record["command"]


def test_maskable_ppo_piece_has_a_ppo_pieces_fields(pieces_dir):
    _, piece = pieces_dir
    ppo, record = piece("ppo"), piece("sb3_maskable_ours")
    assert "arm" in ppo and ppo["global_step"] == TOTAL["ppo"]
    assert_like_ppo(record, ppo, "sb3_maskable_ours")
    sb3 = record["sb3"]
    assert sb3["algo"] == "maskable_ppo" and sb3["test_refused_action_rate"] == 0.0
    assert sb3["kwargs"]["gamma"] == 0.9 and sb3["kwargs"]["n_steps"] == 16 and sb3["kwargs"]["batch_size"] == 48
    assert len(record["val_sharpes"]) == len(ppo["val_sharpes"]) == 5  # the same validation sweeps


def test_plain_ppo_piece_with_sb3_defaults(pieces_dir):
    _, piece = pieces_dir
    record = piece("sb3_ppo_default")
    assert_like_ppo(record, piece("ppo"), "sb3_ppo_default")
    sb3 = record["sb3"]
    assert sb3["algo"] == "ppo" and not sb3["masked"] and sb3["kwargs"] == {"hparams": "default (SB3's own)"}
    # unmasked: its argmax does pick actions the masks refuse (executed as HOLD and counted; 55% in this tiny run),
    # while MaskablePPO's rate above is 0; the tally itself is checked against the masks in the test below
    assert 0.0 < sb3["test_refused_action_rate"] < 1.0


def test_maskable_wrapper_submits_only_allowed_actions():
    """MaskablePPO's wrapper, argmax and sampled, only ever submits allowed actions over a whole test sweep; the
    same untrained policy without its masks does submit refused ones (so the check can fail)."""
    from sb3_contrib import MaskablePPO

    from backtest import run_backtest
    from market_data import DataConfig, prepare_market
    from trading_env import EnvConfig, SB3VecEnv

    market = prepare_market(DataConfig(num_symbols=3, years=0.5, sl_signals=False, cache=False))
    venv = SB3VecEnv(market, num_envs=1, config=EnvConfig(episode_length=24), seed=0)
    model = MaskablePPO("MultiInputPolicy", venv, n_steps=16, batch_size=48, seed=0, device="cpu")
    model.learn(48)

    def checked(policy, seen):
        def act(obs):
            action = policy(obs)
            seen.append(np.take_along_axis(obs["action_mask"], action[..., None], -1).squeeze(-1).astype(bool))
            return action

        return act

    for sample_seed in (None, 7):
        seen, tally = [], {"decisions": 0, "refused": 0}
        policy = sb3_learner.sb3_policy(model, True, sample_seed, tally=tally)
        report = run_backtest(checked(policy, seen), market, "test", EnvConfig(), seed=0)
        assert np.concatenate(seen).all() and tally["refused"] == 0 and tally["decisions"] == 3 * len(seen)
        assert report["agent"]["trades"] > 0  # it did trade: the check is not vacuous
    seen, tally = [], {"decisions": 0, "refused": 0}
    run_backtest(checked(sb3_learner.sb3_policy(model, False, 7, tally=tally), seen), market, "test", EnvConfig(), 0)
    assert not np.concatenate(seen).all() and tally["refused"] == (~np.concatenate(seen)).sum()


def test_summary_reads_a_folder_of_mixed_arms(pieces_dir, tmp_path, monkeypatch):
    """--summary over ppo pieces and SB3 pieces: learning.json keeps the default arm's structure, adds "arms", and
    prints the arms table with each arm's difference from ppo paired by seed."""
    folder, piece = pieces_dir
    records = {arm: json.loads(json.dumps(piece(arm))) for arm in ("ppo", "sb3_maskable_ours", "sb3_ppo_default")}
    # a second seed of ppo and of one SB3 arm, from the real pieces with shifted Sharpes, for a paired interval
    for arm, shift in (("ppo", 1.0), ("sb3_maskable_ours", 3.0)):
        second = json.loads(json.dumps(records[arm]))
        second["seed"] = 2
        second["test"]["agent"]["sharpe"] += shift
        (folder if arm == "ppo" else folder / arm).joinpath("0.3_seed2.json").write_text(json.dumps(second))
    del records["sb3_maskable_ours"]["test"]["agent_sampled"]  # an arm may omit the sampled policy
    (folder / "sb3_maskable_ours" / "0.3_seed1.json").write_text(json.dumps(records["sb3_maskable_ours"]))
    monkeypatch.setattr(bl, "PIECES", folder)
    monkeypatch.setattr(bl, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main() installs its own; restored after the test
    argv = ["bench_learning.py", "--summary", "--pair", "sb3_maskable_ours", "sb3_ppo_default"]
    monkeypatch.setattr(sys, "argv", argv)
    bl.main()
    out = json.loads((tmp_path / "learning.json").read_text())
    assert set(out) == {"machine", "benchmark", "markets", "table", "pieces", "arms", "arms_table", "pairs"}
    assert out["pieces"] == [str(folder / f"0.3_seed{k}.json") for k in (1, 2)]  # outside the repo: absolute
    assert list(out["markets"]) == ["0.3"] and out["markets"]["0.3"]["seeds"] == [1, 2]
    assert set(out["arms"]) == {"sb3_maskable_ours", "sb3_ppo_default"}
    mask = out["arms"]["sb3_maskable_ours"]["markets"]["0.3"]
    ppo_sharpe = records["ppo"]["test"]["agent"]["sharpe"]
    mine = records["sb3_maskable_ours"]["test"]["agent"]["sharpe"]
    assert mask["agent_sampled_mean"] is None
    assert mask["minus_ppo"]["seeds"] == [1, 2]
    assert mask["minus_ppo"]["diff"] == pytest.approx([mine - ppo_sharpe, mine - ppo_sharpe + 2.0])
    assert mask["minus_ppo"]["mean"] == pytest.approx(mine - ppo_sharpe + 1.0)
    plain = out["arms"]["sb3_ppo_default"]["markets"]["0.3"]
    assert plain["minus_ppo"]["seeds"] == [1] and np.isnan(plain["minus_ppo"]["ci95"][0])  # one seed: no interval
    pair = out["pairs"]["sb3_maskable_ours - sb3_ppo_default"]  # two arms, neither of them ppo: seed 1 in both
    plain_sharpe = records["sb3_ppo_default"]["test"]["agent"]["sharpe"]
    assert pair["markets"]["0.3"]["seeds"] == [1]
    assert pair["markets"]["0.3"]["diff"] == pytest.approx([mine - plain_sharpe])
    rows = out["arms_table"].splitlines()
    assert [r.split(" | ")[1] for r in rows[2:]] == ["ppo", "sb3_maskable_ours", "sb3_ppo_default"]
    assert (tmp_path / "learning.png").is_file()
    assert (tmp_path / "learning_arms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # every arm, per seed


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--arm", "ppo_gru", "--signal", "0.3", "--seed", "1"], "invalid choice: 'ppo_gru'"),
        (["--arms", "ppo", "sb3_ppo_ours", "--summary"], "--arms lists the learners of --all"),
        (["--jobs", "0", "--all"], "--jobs 0"),
        (["--all", "--pair", "ppo_lstm", "ppo"], "--pair pairs two arms' pieces in the summary: add --summary"),
        (["--arm", "ppo_curriculum", "--signal", "0.3", "--seed", "1", "--", "--help"], "left no run folder"),
        ([], "nothing to do"),
        (
            ["--arm", "sb3_ppo_ours", "--signal", "0.3", "--seed", "1", "--", "--walk-forward", "2"],
            "arm sb3_ppo_ours (signal 0.3, seed 1): --walk-forward is a flag of ppo_symbol_agent.py",
        ),
    ],
)
def test_bad_flags_are_refused_in_one_message(flags, says):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_learning.py"), *flags], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sb3_learner_refuses_ppo_only_flags(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sb3_learner.py"), "--algo", "ppo", "--hparams", "ours"]
    proc = subprocess.run([*cmd, "--save-model", "--run-dir", str(tmp_path)], cwd=tmp_path, env=script_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--save-model is a flag of ppo_symbol_agent.py" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_paired_pairs_by_market_and_seed():
    """--against and --pair: one set of pieces minus another, on the seeds both have, market by market."""

    def piece(signal, seed, sharpe):
        return {"signal": signal, "seed": seed, "test": {"agent": {"sharpe": sharpe}}}

    mine = [piece(0.3, 1, 9.0), piece(0.3, 2, 7.0), piece(0.3, 3, 5.0), piece(0.0, 1, 0.5)]
    theirs = [piece(0.3, 1, 7.0), piece(0.3, 2, 6.0), piece(0.0, 2, 0.1)]  # seed 3 and the placebo's seed 1 unpaired
    out = bl.paired(mine, theirs, "this study", "study other")
    assert list(out["markets"]) == ["0.3"]  # no seed of the placebo in both
    m = out["markets"]["0.3"]
    assert m["seeds"] == [1, 2] and m["diff"] == [2.0, 1.0] and m["mean"] == pytest.approx(1.5)
    half = 12.706 * np.std([2.0, 1.0], ddof=1) / np.sqrt(2)  # Student t, 1 degree of freedom
    assert m["ci95"] == pytest.approx([1.5 - half, 1.5 + half], rel=1e-3)
    assert "| 0.3 | 2 | 8.00 | 6.50 | +1.50" in out["table"]
    assert "| this study minus study other, paired" in out["table"].splitlines()[0]
