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


def test_go_table_flags_a_master_that_ignores_the_regime():
    """A master whose go criterion passes with one constant directive: the table shows the same risk multiplier in
    every hidden regime and that the fixed defensive directive beats it."""
    backtest = {name: {"sharpe": 1.0, "max_drawdown": -0.1, "exposure": 0.5} for name in bm.GO_NAMES}
    backtest["master"] = {"sharpe": 2.0, "max_drawdown": -0.02, "exposure": 0.1}
    backtest["defensive"] = {"sharpe": 2.5, "max_drawdown": -0.02, "exposure": 0.12}
    constant = {r: {"risk_multiplier": 0.5, "regime_mode": -1.0, "exposure": 0.1} for r in ("bull", "bear", "crisis")}
    piece = {"foresight": 0.5, "seed": 1, "backtest": backtest, "directive_analysis": {"by_regime": constant},
             "go_criterion": {"passed": True, "drawdown_cut_vs_matched_neutral": 0.8}}  # fmt: skip
    row = bm.go_table([piece]).splitlines()[2]
    assert "| 2.00 / -2.0% / 0.100 |" in row and "| 80.0% | passed | no | 0.50 / 0.50 / 0.50 / - |" in row
