"""The algorithm is written out in each script on purpose (CleanRL style: what a reader copies and modifies stands
in the file). The helpers that both training scripts hold must stay equal: this test fails with a diff when one copy
drifts, so that a fix made in one script reaches the other."""

from __future__ import annotations

import difflib
import inspect

import pytest

import mappo_master
import ppo_symbol_agent

SHARED = ("to_torch", "masked_policy", "choice_mean", "compute_gae", "ppo_loss")


@pytest.mark.parametrize("name", SHARED)
def test_the_scripts_hold_equal_copies(name):
    ppo, mappo = (inspect.getsource(getattr(m, name)) for m in (ppo_symbol_agent, mappo_master))
    diff = difflib.unified_diff(ppo.splitlines(True), mappo.splitlines(True), "ppo_symbol_agent.py", "mappo_master.py")
    diff = "".join(diff)
    assert ppo == mappo, f"{name} differs between the scripts; make the copies equal again:\n{diff}"


def test_every_helper_both_scripts_define_is_guarded():
    """A helper that both scripts define under one name is either in SHARED or a different function on purpose
    (none today): a new shared helper must join SHARED."""

    def helpers(module):
        return {n for n, f in inspect.getmembers(module, inspect.isfunction) if f.__module__ == module.__name__}

    assert helpers(ppo_symbol_agent) & helpers(mappo_master) == set(SHARED)
