"""Tests of experiment.py, the run bookkeeping: checkpoints (round trip, mismatches, bad files) and the layout rule
that the shared modules import no script. The run folder, logging, resume, SIGINT and torchrun are exercised by
running the scripts (test_ppo_symbol_agent.py, test_mappo_master.py, test_reliability.py)."""

import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_encoders import cfg, make_obs

from encoders import SymbolPolicy
from experiment import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Args:
    seed: int = 1
    learning_rate: float = 3e-4
    exp_name: str = "test"


def _train_step(policy, opt, obs):
    logits, value = policy(obs)
    opt.zero_grad()
    (-torch.log_softmax(logits, -1)[..., 0].mean() + value.pow(2).mean()).backward()
    opt.step()


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    obs = make_obs(2, 3)
    policy = SymbolPolicy(3, cfg("transformer", num_layers=1))
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    _train_step(policy, opt, obs)
    norm = {"mean": np.arange(4, dtype=np.float64), "var": np.ones(4), "count": 7.0}
    path = tmp_path / "ckpt" / "agent.pt"
    save_checkpoint(path, policy, opt, obs_norm=norm, args=_Args(), global_step=1234, extra={"note": "x"})
    draws = (random.random(), np.random.rand(3), torch.rand(3))

    torch.manual_seed(99)  # a different init and a fresh optimizer
    other = SymbolPolicy(3, cfg("transformer", num_layers=1))
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    payload = load_checkpoint(path, other, other_opt, restore_rng=True)
    redraw = (random.random(), np.random.rand(3), torch.rand(3))
    # restore_rng put every generator back to its state at save time, so the draws repeat.
    assert draws[0] == redraw[0] and np.array_equal(draws[1], redraw[1]) and torch.equal(draws[2], redraw[2])

    for (k, a), (_, b) in zip(policy.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert payload["global_step"] == 1234
    assert payload["args"] == {"seed": 1, "learning_rate": 3e-4, "exp_name": "test"}
    assert torch.equal(payload["obs_norm"]["mean"], torch.arange(4, dtype=torch.float64))
    assert payload["extra"] == {"note": "x"}
    # The optimizer state came back too: one more identical step keeps the two models bit-identical.
    _train_step(policy, opt, obs)
    _train_step(other, other_opt, obs)
    for a, b in zip(policy.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not list(path.parent.glob("*.tmp")), "the temporary file was left behind"


def test_checkpoint_mismatch_and_bad_files(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, SymbolPolicy(3, cfg("mlp")))
    with pytest.raises(ValueError, match=r"actor\.weights\.0.*saved \(3, 256, 256\) vs model \(4, 256, 256\)"):
        load_checkpoint(path, SymbolPolicy(4, cfg("mlp")))
    with pytest.raises(ValueError, match="Missing keys: .*encoder.layers"):
        load_checkpoint(path, SymbolPolicy(3, cfg("transformer", num_layers=1)))
    with pytest.raises(ValueError, match="no optimizer state"):
        m = SymbolPolicy(3, cfg("mlp"))
        load_checkpoint(path, m, torch.optim.Adam(m.parameters()))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", SymbolPolicy(3, cfg("mlp")))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(bad, SymbolPolicy(3, cfg("mlp")))


def test_shared_modules_import_no_script():
    code = (
        "import sys, encoders, experiment, trading_env, market_data; "
        "print(sorted(m for m in ('ppo_symbol_agent', 'mappo_master', 'validate_stage5') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_has_no_hard_line_breaks_inside_field_docstrings():
    """tyro keeps a field docstring's line break when the next line does not start with a letter (e.g. indentation,
    a digit, a bracket, an empty line): every field's help of every script must read as one paragraph, so every
    continuation line of a field docstring starts with a letter. Read from the source with ast, field by field."""
    import ast
    import dataclasses
    import inspect
    import itertools
    import textwrap

    import mappo_master
    import ppo_symbol_agent
    import validate_stage5

    def classes(cls, seen):
        yield cls
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.init and dataclasses.is_dataclass(default) and type(default) not in seen:
                seen.add(type(default))
                yield from classes(type(default), seen)

    checked = 0
    for script in (ppo_symbol_agent, mappo_master, validate_stage5):
        for cls in classes(script.Args, set()):
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
            for field, doc in itertools.pairwise(body):
                if not (isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr)):
                    continue
                if not isinstance(doc.value, ast.Constant) or not isinstance(doc.value.value, str):
                    continue
                checked += 1
                for line in doc.value.value.split("\n")[1:]:
                    where = f"{script.__name__}: {cls.__name__}.{field.target.id}"
                    assert line[:1].isalpha(), f"{where}: a line of its docstring starts with {line[:1]!r}: {line!r}"
    assert checked > 100  # every script's Args and the configs they nest
