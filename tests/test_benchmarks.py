"""The benchmarks' aggregation: the learning benchmark's 95% interval, placebo margin, table and picture, and the
master go table, computed from piece records written here (the real pieces come from training runs under
benchmarks/results/learning/ and benchmarks/results/mappo_go/)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_real_png

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_learning as bl  # noqa: E402
import bench_mappo as bm  # noqa: E402


def piece(signal: float, seed: int, agent: float, ceiling: float) -> dict:
    """A piece record with the fields the summary reads: the agent's test Sharpe, every baseline's, the ceiling's."""
    test = {name: {"sharpe": -0.5 + 0.1 * i} for i, name in enumerate(bl.BASELINES)}
    test["agent"] = {"sharpe": agent, "sharpe_se": 0.5, "exposure": 0.3, "trade_rate": 0.1, "bars": 2600}
    test["agent_sampled"] = {"sharpe": agent - 1.0}
    test["rule_ceiling"] = {"sharpe": ceiling}
    return {"signal": signal, "seed": seed, "test": test, "wall_s": 500.0}


def test_summary_interval_table_and_picture(tmp_path):
    agents = {0.3: [5.0, 6.0, 7.0, 6.5, 5.5], 0.0: [-0.4, 0.1, -0.2, 0.3, -0.3]}
    pieces = [piece(s, k + 1, a, 9.0 if s else 1.0) for s, values in agents.items() for k, a in enumerate(values)]
    markets = bl.summarize(pieces)
    assert list(markets) == ["0.3", "0"]  # strongest signal first
    m = markets["0.3"]
    values = np.array(agents[0.3])
    half = 2.7764451 * values.std(ddof=1) / np.sqrt(5)  # Student t, 4 degrees of freedom, 97.5%
    assert m["agent_mean"] == pytest.approx(6.0) and m["agent_ci95"] == pytest.approx([6.0 - half, 6.0 + half])
    assert m["seeds_above_1"] == 5 and m["share_of_ceiling"] == pytest.approx(6.0 / 9.0)
    assert m["agent_sampled_mean"] == pytest.approx(5.0)
    assert markets["0"]["share_of_ceiling"] is None  # the placebo's ceiling is noise: no share of it
    best = max(-0.5 + 0.1 * i for i in range(len(bl.BASELINES)))  # the best baseline of each seed
    assert markets["0"]["margin_over_best_baseline_se"] == pytest.approx([(a - best) / 0.5 for a in agents[0.0]])
    text = bl.table(markets)
    assert text.count("\n") == 3 and "| 0.3 | 5 | 6.00 [" in text and "67%" in text
    bl.plot(markets, tmp_path / "learning.png")
    assert_real_png(tmp_path / "learning.png")


def test_lead_lag_markets_are_graded_against_the_cross_rule(tmp_path):
    """Lead-lag pieces (issue #21) sit beside the planted ones under their own key ("ll" and kappa), after them in
    the tables, with the cross rule as their ceiling (the own-window rule is no ceiling there) and no share of it on
    the placebo (kappa 0); their files do not collide with the planted markets'."""
    planted = [piece(0.3, k, 5.0, 8.0) for k in (1, 2)]
    lead = [piece(0.0, k, 3.0 + k, 0.5) | {"lead_lag": 0.45} for k in (1, 2)]
    placebo = [piece(0.0, k, -0.2 * k, 0.5) | {"lead_lag": 0.0} for k in (1, 2)]
    for q, cross in zip(lead + placebo, (7.0, 7.0, -4.0, -4.0), strict=True):
        q["test"]["cross_rule"] = {"sharpe": cross}
    markets = bl.summarize(planted + lead + placebo)
    assert list(markets) == ["0.3", "ll0.45", "ll0"]
    assert markets["ll0.45"]["ceiling"] == "cross_rule" and markets["ll0.45"]["ceiling_mean"] == 7.0
    assert markets["ll0.45"]["share_of_ceiling"] == pytest.approx(4.5 / 7.0)
    assert markets["ll0"]["share_of_ceiling"] is None and markets["0.3"]["ceiling_mean"] == 8.0
    assert "| ll0.45 | 2 | 4.50 [" in bl.table(markets) and "64%" in bl.table(markets)
    paths = {bl.piece_path(0.0, 1), bl.piece_path(0.0, 1, lead_lag=0.0), bl.piece_path(0.0, 1, lead_lag=0.45)}
    assert {p.name for p in paths} == {"0_seed1.json", "ll0_seed1.json", "ll0.45_seed1.json"}
    by_arm = bl.summarize_arms({"ppo": lead, "ppo_attention": [q | {"seed": q["seed"]} for q in lead]})
    assert by_arm["ppo_attention"]["ll0.45"]["minus_ppo"]["mean"] == 0.0
    assert "| ll0.45 | ppo_attention | 2 |" in bl.arms_table(by_arm)
    bl.plot(markets, tmp_path / "learning.png")
    assert_real_png(tmp_path / "learning.png")


def test_learning_speed_counts_symbol_steps_to_80_percent_of_ppos_final_validation_level():
    """An arm's speed: the symbol-steps at its first periodic evaluation at or above 80% of ppo's final validation
    level (the mean of ppo's last 5), seed by seed; a seed that never gets there is nan and counted as such."""
    ppo = [piece(0.3, k, 4.0, 8.0) | {"val_sharpes": [0.0] * 5 + [1.0] * 5, "global_step": 1_000_000} for k in (1, 2)]
    fast = piece(0.3, 1, 4.0, 8.0) | {"val_sharpes": [0.2, 0.8, 0.9] + [1.0] * 7, "global_step": 1_000_000}
    never = piece(0.3, 2, 4.0, 8.0) | {"val_sharpes": [0.5] * 10, "global_step": 1_000_000}
    assert bl.steps_to(fast, 0.8) == 200_000 and np.isinf(bl.steps_to(never, 0.8))
    uneven = fast | {"val_steps": [90_000 * k for k in range(1, 10)] + [1_000_000]}  # the last interval shorter
    assert bl.steps_to(uneven, 0.8) == 180_000
    speed = bl.learning_speed([fast, never], ppo)
    assert speed["seeds"] == [1, 2] and speed["target"] == pytest.approx([0.8, 0.8])
    assert speed["arm_steps"][0] == 200_000 and np.isinf(speed["arm_steps"][1])
    assert speed["ppo_steps"] == [600_000, 600_000]
    by_arm = bl.summarize_arms({"ppo": ppo, "ppo_warm_direction": [fast, never]})
    assert by_arm["ppo_warm_direction"]["0.3"]["speed"]["seeds"] == [1, 2]
    assert "| never (1 never) / 0.6 |" in bl.arms_table(by_arm)  # half never get there: the median is never
    third = piece(0.3, 3, 4.0, 8.0) | {"val_sharpes": [0.9] * 10, "global_step": 1_000_000}
    ppo3 = ppo + [ppo[0] | {"seed": 3}]
    assert "| 0.2 (1 never) / 0.6 |" in bl.arms_table(
        bl.summarize_arms({"ppo": ppo3, "ppo_lstm": [fast, never, third]})
    )
    losing = [p | {"val_sharpes": [0.5] * 5 + [-1.0] * 5} for p in ppo]  # ppo's final level below 0: no target
    assert bl.learning_speed([fast, never], losing)["seeds"] == []


def test_the_arms_table_shows_peak_memory_where_pieces_have_it():
    rows = [
        piece(0.3, 1, 4.0, 8.0) | {"peak_memory_mib": 1000.0},
        piece(0.3, 2, 4.0, 8.0) | {"peak_memory_mib": 1200.0},
    ]
    by_arm = bl.summarize_arms({"ppo": rows, "ppo_lstm": [piece(0.3, 1, 4.0, 8.0)]})  # an old piece: no figure
    assert (
        by_arm["ppo"]["0.3"]["peak_memory_mib_mean"] == 1100.0
        and by_arm["ppo_lstm"]["0.3"]["peak_memory_mib_mean"] is None
    )
    table = bl.arms_table(by_arm)
    assert "| 1,100 |" in table and "| 8.3 | - |" in table


def go_piece(market: str, seed: int, margin: float, gain: float | None, passed: bool) -> dict:
    backtest = {name: {"sharpe": 1.0, "max_drawdown": -0.1, "exposure": 0.5} for name in bm.GO_NAMES}
    backtest["master"]["sharpe"] = 1.0 + margin
    go = {"go": passed, "sharpe_passed": passed, "drawdown_passed": False, "margin_vs_best_constant": margin,
          "margin_se": 0.1, "oracle_gain": gain, "oracle_gain_se": None if gain is None else 0.2,
          "master_share_of_oracle_gain": None if not gain else margin / gain, "exposure_master": 0.3,
          "exposure_best_constant": 0.1, "drawdown_cut_vs_matched_best_constant": 0.05}  # fmt: skip
    why = {"p_defensive_given_R": 0.7, "p_defensive_given_M": 0.1,
           "by_edge_state": {"M": {"exposure": 0.2}, "R": {"exposure": 0.05}}} if gain is not None else {}  # fmt: skip
    return {"market": market, "seed": seed, "backtest": backtest, "go_criterion": go, "directive_analysis": why}


def test_go_summary_counts_intervals_and_refuses_a_skill_test_without_an_oracle_gain():
    pieces = [go_piece("flip", k, m, 1.0, m > 0) for k, m in enumerate([0.2, 0.4, 0.6], 1)]
    pieces[1]["backtest"]["corr_rule"]["sharpe"] = 1.1  # a rule ahead of the ceiling on seed 2
    pieces += [go_piece("placebo-b", k, m, g, False) for k, (m, g) in enumerate([(0.1, 0.1), (-0.1, -0.1)], 1)]
    pieces += [go_piece("foresight", 1, 0.0, None, False)]
    summary = bm.market_summary(pieces)
    flip = summary["flip"]
    half = 4.303 * np.std([0.2, 0.4, 0.6], ddof=1) / np.sqrt(3)  # Student t, 2 degrees of freedom
    assert flip["seeds"] == 3 and flip["go"] == 3 and flip["beats_every_baseline"] == 3
    assert flip["oracle_beats_every_baseline"] == 2 and summary["foresight"]["oracle_beats_every_baseline"] is None
    assert flip["margin_mean"] == pytest.approx(0.4) and flip["margin_ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    assert flip["skill_test"] and flip["master_share_of_oracle_gain_mean"] == pytest.approx(0.4)
    assert not summary["placebo-b"]["skill_test"]  # the oracle's mean gain is under one standard error
    assert summary["foresight"]["oracle_gain_mean"] is None and not summary["foresight"]["skill_test"]
    text = bm.summary_table(summary)
    assert "| flip | 3 | 3 | 2 | 0 | 3 | +0.40 [" in text and "no (oracle gain < 1 se)" in text
    rows = bm.go_table(pieces).splitlines()
    assert rows[2].startswith("| flip | 1 | 1.20 | 1.00 |") and "| +0.20 (0.10) | +1.00 (0.20) |" in rows[2]
    assert "| 0.300 / 0.100 | 5.0% | 0.70 / 0.10 | 0.050 / 0.200 | yes |" in rows[2]
    assert rows[-1].startswith("| foresight | 1 |") and "| - | - | no |" in rows[-1]  # no hidden edge state


def test_compare_pairs_two_variants_seed_by_seed(tmp_path):
    """--compare: A's master over B's on the same test days, per seed the paired margin of their daily returns, per
    market the Student-t interval over seeds; seeds missing from either folder are left out."""
    import json

    import backtest as bt

    rng = np.random.default_rng(0)
    days = {k: rng.normal(0.001, 0.01, 250) for k in (1, 2, 3)}
    for variant, extra in (("a", 0.002), ("b", 0.0)):
        (tmp_path / variant).mkdir()
        for k in (1, 2, 3) if variant == "a" else (1, 2, 3, 4):
            p = go_piece("flip", k, 0.0, 1.0, False)
            p["daily_returns"] = {"master": list(days.get(k, days[1]) + extra * k)}
            (tmp_path / variant / f"flip_seed{k}.json").write_text(json.dumps(p))
    record = bm.compare(tmp_path / "a", tmp_path / "b", out=tmp_path / "ab.json")
    margins = [bt.paired_daily_margin(days[k] + 0.002 * k, days[k], 252.0)[0] for k in (1, 2, 3)]
    assert [r["margin"] for r in record["rows"]] == pytest.approx(margins) and all(m > 0 for m in margins)
    mean, ci = bm.interval95(margins)
    flip = record["markets"]["flip"]
    assert flip["seeds"] == 3 and flip["seeds_ahead"] == 3 and flip["margin_mean"] == pytest.approx(mean)
    assert flip["margin_ci95"] == pytest.approx(ci) and json.loads((tmp_path / "ab.json").read_text())["a"] == "a"
