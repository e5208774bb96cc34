"""Supervised signals: AUC/F1 helpers, chance-level AUC on pure noise, a clear edge on a planted signal, and
fitting on the train split only (changing later bars leaves the fitted classifiers unchanged)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import market_data as md

torch.set_num_threads(1)

SMALL = dict(num_symbols=4, years=1.0, sl_epochs=3, sl_max_samples=4000)


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding creates many ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert md.roc_auc(y, s) == pytest.approx(pairwise, abs=1e-12)
    assert md.roc_auc(y, y.astype(float)) == 1.0 and md.roc_auc(y, -y.astype(float)) == 0.0
    assert np.isnan(md.roc_auc(np.ones(5), np.arange(5.0)))


def test_f1_score_by_hand():
    y = np.array([1, 1, 0, 0, 1])
    p = np.array([0.9, 0.2, 0.7, 0.1, 0.6])  # tp 2, fp 1, fn 1
    assert md.f1_score(y, p) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_forward_labels_use_the_horizon_and_mark_the_end_invalid():
    close = np.array([[1.0], [2.0], [1.5], [np.nan], [3.0]])
    y, valid = md.forward_labels(close, horizon=2, threshold=0.0)
    assert y[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert valid[:, 0].tolist() == [True, False, True, False, False]


def _prepared(signal_strength: float) -> md.PreparedMarket:
    return md.make_synthetic_prepared(seed=3, signal_strength=signal_strength, sl_signals=True, **SMALL)


def test_pure_noise_gives_chance_auc():
    p = _prepared(0.0)
    for name in md.SL_MODELS:
        assert 0.45 <= p.sl_metrics[name]["val_auc"] <= 0.55, p.sl_metrics
        assert p.sl_metrics[name]["val_samples"] > 500


def test_planted_signal_gives_clear_edge():
    p = _prepared(0.5)
    for name in md.SL_MODELS:
        assert p.sl_metrics[name]["val_auc"] > 0.6, p.sl_metrics
        assert 0.0 < p.sl_metrics[name]["val_f1"] <= 1.0
    assert p.sl_probs.shape == (*p.data.close.shape, 3) and p.sl_probs.dtype == np.float32
    assert p.sl_probs.min() >= 0 and p.sl_probs.max() <= 1
    assert np.all(p.sl_probs[: p.warmup] == 0.5)
    assert p.sl_probs[p.splits["test"][0] :].std() > 0.01


def test_classifiers_see_only_the_train_split():
    cfg = md.DataConfig(seed=3, signal_strength=0.3, sl_signals=True, cache=False, **SMALL)
    data = md.load_market(cfg)
    base = md.build_prepared(data, cfg)
    stop = base.splits["train"][1]
    other = md.generate_synthetic_market(4, 1.0, seed=11, signal_strength=0.0)
    swapped = {
        k: np.vstack([getattr(data, k)[:stop], getattr(other, k)[stop:] * 2.0])
        for k in ("open", "high", "low", "close")
    }
    changed = md.build_prepared(replace(data, **swapped), cfg)
    np.testing.assert_array_equal(changed.sl_probs[:stop], base.sl_probs[:stop])
    assert not np.array_equal(changed.sl_probs[stop:], base.sl_probs[stop:])
    for name in md.SL_MODELS:
        assert changed.sl_metrics[name]["train_auc"] == base.sl_metrics[name]["train_auc"]
