"""The algorithm is written out in each script on purpose (CleanRL style: what a reader copies and modifies stands
in the file). The helpers that both training scripts hold must stay equal: this test fails with a diff when one copy
drifts, so that a fix made in one script reaches the other."""

from __future__ import annotations

import difflib
import inspect
import itertools

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


def test_the_experiment_flags_are_written_out_equally():
    """Each script's Args writes out the experiment flags whole (no base class, STYLE rule 1); the fields both
    scripts have in their experiment group keep the same type, default and documentation."""
    import ast

    def experiment_fields(module):
        body = next(n for n in ast.parse(inspect.getsource(module)).body if getattr(n, "name", "") == "Args").body
        fields = {}
        for node, doc in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign):
                fields[node.target.id] = (
                    ast.unparse(node) + "\n" + (ast.unparse(doc) if isinstance(doc, ast.Expr) else "")
                )
            if (
                isinstance(doc, ast.AnnAssign) and doc.target.id == "encoder_preset"
            ):  # the experiment group's last field
                fields["encoder_preset"] = ast.unparse(doc) + "\n" + ast.unparse(body[body.index(doc) + 1])
                return fields
        raise AssertionError(f"{module.__name__}.Args has no encoder_preset field")

    ppo, mappo = experiment_fields(ppo_symbol_agent), experiment_fields(mappo_master)
    shared = sorted(set(ppo) & set(mappo))
    assert len(shared) >= 12, shared
    for name in shared:
        assert ppo[name] == mappo[name], f"Args.{name} differs between the scripts:\n{ppo[name]}\n{mappo[name]}"
