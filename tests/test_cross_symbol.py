"""The cross-symbol block (EncoderConfig.cross_symbol="attention", encoders.CrossSymbolAttention): "none" leaves the
network as it was; permutation equivariance across symbols (of the block, and of SymbolPolicy with shared heads);
causality (no mixing across envs or bars, and future bars of the market change no output before them); a symbol's
logit reads other symbols' inputs only with the block; it learns a hidden leader map; checkpoints rebuild with it;
the training script runs with it and --shared-heads, alone and under torchrun."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import only_run, run_script
from test_encoders import _loop_heads
from test_ppo_symbol_agent import ITER, TINY
from test_trading_env import _perturb_after

import experiment as xp
import trading_env as te
from encoders import (
    RET_1,
    CrossSymbolAttention,
    EncoderConfig,
    MasterNetwork,
    SymbolPolicy,
    lagged_correlation,
    random_observation,
    set_input_shapes,
)
from market_data import lead_lag_leaders, random_walk_market

torch.set_num_threads(1)
CROSS = ["--encoder.cross-symbol", "attention", "--encoder.cross-symbol-heads", "2"]


def cfg(cross="attention", graph=True, dim=32, heads=4):
    return EncoderConfig(kind="mlp", dropout=0.0, d_model=dim, output_dim=dim, cross_symbol=cross,
                         cross_symbol_heads=heads, cross_symbol_graph=graph)  # fmt: skip


def trained(policy: SymbolPolicy, seed: int = 0) -> SymbolPolicy:
    """The policy with random (non-zero) output weights, graph and correlation weights in its cross-symbol block, as
    after training: a new block is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block = policy.cross
        for p in (block.out.weight, block.lag_weight, *([block.graph] if block.graph is not None else [])):
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p is block.out.weight else 1.0))
    return policy.eval()


def permuted(obs: dict, perm: torch.Tensor) -> dict:
    return {k: v[:, perm] for k, v in obs.items()}


# ---------------------------------------------------------------------------------------------------------------
# "none" is today's network; a new block is the identity
# ---------------------------------------------------------------------------------------------------------------


def test_none_builds_todays_network_and_a_new_block_starts_as_it():
    torch.manual_seed(3)
    plain = SymbolPolicy(5, cfg("none"))
    torch.manual_seed(3)
    mixed = SymbolPolicy(5, cfg())
    assert plain.cross is None and not any(k.startswith("cross") for k in plain.state_dict())
    own = mixed.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in plain.state_dict().items())  # the seed gives the same weights
    obs = random_observation(3, 5)
    with torch.no_grad():
        for a, b in zip(plain(obs), mixed(obs), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert EncoderConfig().cross_symbol == "none"
    with pytest.raises(ValueError, match="cross_symbol"):
        SymbolPolicy(2, EncoderConfig(kind="mlp", cross_symbol="graph"))
    with pytest.raises(ValueError, match="cross_symbol_dim=30 must be a multiple of cross_symbol_heads=4"):
        SymbolPolicy(2, EncoderConfig(kind="mlp", cross_symbol="attention", cross_symbol_dim=30))


def test_the_block_leaves_zero_by_its_gradient():
    """At initialisation only W_o's gradient is non-zero (the rest sits behind it); once W_o has moved, every
    parameter of the block learns."""
    moved = []
    for policy in (SymbolPolicy(3, cfg(), shared_heads=True), trained(SymbolPolicy(3, cfg(), shared_heads=True))):
        logits, value = policy(random_observation(4, 3))
        (torch.log_softmax(logits, -1)[..., 1].sum() + value.sum()).backward()
        moved.append({name for name, p in policy.cross.named_parameters() if p.grad.abs().sum() > 0})
    assert moved[0] == {"out.weight", "out.bias"}
    assert moved[1] == {name for name, _ in policy.cross.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Permutation equivariance across symbols
# ---------------------------------------------------------------------------------------------------------------


def test_the_block_is_permutation_equivariant():
    """Without the graph under any permutation (and any number of symbols); with it when the graph's rows and
    columns are permuted with the symbols, and not otherwise: the graph is what knows which symbol is which."""
    torch.manual_seed(0)
    z, tech, perm = torch.randn(4, 6, 32), torch.randn(4, 6, 24, 23), torch.randperm(6)
    block = CrossSymbolAttention(cfg(graph=False), 6)
    nn.init.normal_(block.out.weight)
    nn.init.normal_(block.lag_weight)
    with torch.no_grad():
        torch.testing.assert_close(block(z[:, perm], tech[:, perm]), block(z, tech)[:, perm])
        assert block(torch.randn(2, 3, 9, 32), torch.randn(2, 3, 9, 24, 23)).shape == (2, 3, 9, 32)  # any S
        graphed = CrossSymbolAttention(cfg(), 6)
        graphed.load_state_dict(block.state_dict() | {"graph": 2 * torch.randn(4, 6, 6)})
        moved = CrossSymbolAttention(cfg(), 6)
        moved.load_state_dict(graphed.state_dict() | {"graph": graphed.graph[:, perm][:, :, perm]})
        torch.testing.assert_close(moved(z[:, perm], tech[:, perm]), graphed(z, tech)[:, perm])
        assert not torch.allclose(graphed(z[:, perm], tech[:, perm]), graphed(z, tech)[:, perm])
    with pytest.raises(ValueError, match="7 symbols but the cross-symbol graph was built for 6"):
        graphed(torch.randn(2, 7, 32), torch.randn(2, 7, 24, 23))


def test_lagged_correlation_equals_a_loop():
    """Entry (i, j): corr(r_i[t], r_j[t - 1]) over the window in standard errors, as numpy computes it pair by
    pair; a flat window gives 0, and ret_1 is the technical column the block reads."""
    import market_data

    g = torch.Generator().manual_seed(4)
    r = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    r[1, 3] = 0.7  # a flat window (e.g. a halted symbol)
    z = lagged_correlation(r)  # (2, 5, 5)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                flat = min(r[b, i].std(), r[b, j].std()) < 1e-9
                want = 0.0 if flat else np.corrcoef(r[b, i, 1:], r[b, j, :-1])[0, 1] * np.sqrt(23)
                assert z[b, i, j].item() == pytest.approx(want, abs=1e-9), (b, i, j)
    assert market_data.FEATURE_NAMES[RET_1] == "ret_1"


@pytest.mark.parametrize("graph", [False, True])
def test_symbol_policy_with_shared_heads_is_permutation_equivariant(graph):
    """Permuting the symbol axis of every observation array permutes the logits and values the same way (the graph
    permuted with it); the directives enter after the block and permute too."""
    torch.manual_seed(1)
    policy = trained(SymbolPolicy(5, cfg(graph=graph), shared_heads=True, directive_dim=4))
    obs, perm = random_observation(3, 5, directives=4), torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        logits, value = policy(obs)
        base = policy.embed(obs)
        if graph:
            policy.cross.graph.copy_(policy.cross.graph[:, perm][:, :, perm])
        p_logits, p_value = policy(permuted(obs, perm))
        embedded = policy.embed(permuted(obs, perm))
    torch.testing.assert_close(p_logits, logits[:, perm])
    torch.testing.assert_close(p_value, value[:, perm])
    # the master still pools (E, S, D) embeddings, symmetric in the symbols
    master = MasterNetwork(embed_dim=32, global_dim=3)
    assert embedded.shape == (3, 5, 32)
    with torch.no_grad():
        g = torch.randn(3, 3)
        torch.testing.assert_close(master.get_value(embedded, g), master.get_value(base, g))


def test_per_symbol_heads_stay_batched_after_the_block():
    """With per-symbol heads the heads are the symbols' own (not equivariant by design); the block still feeds them
    (B, S, D) and they run as one einsum, equal to a loop over symbols."""
    policy = trained(SymbolPolicy(4, cfg(), shared_heads=False))
    obs = random_observation(3, 4)
    with torch.no_grad():
        z = policy._head_input(obs)  # (3, 4, 32)
        value = policy.critic(z)
        for s in range(4):
            torch.testing.assert_close(value[:, s], _loop_heads(policy.critic, s)(z[:, s]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Who reads whom: other symbols of the same env and bar only
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cross", ["none", "attention"])
def test_a_logit_reads_other_symbols_only_with_the_block(cross):
    """d logit(row b, symbol i) / d input(row b', symbol j): non-zero for j != i (same row) with the block, zero
    without it; zero across rows either way (rows are envs, or bars in the update batch: no mixing over time)."""
    policy = SymbolPolicy(4, cfg(cross), shared_heads=True)
    if cross == "attention":
        trained(policy)
    obs = random_observation(3, 4)
    obs["technical"].requires_grad_(True)
    logits = policy.get_logits(obs)  # (3, 4, 7)
    (grad,) = torch.autograd.grad(logits[1, 2].sum(), obs["technical"])  # row 1, symbol 2
    per_input = grad.abs().sum((-1, -2))  # (3, 4): rows x symbols
    assert per_input[1, 2] > 0
    assert (per_input[[0, 2]] == 0).all()  # other rows: untouched
    other = per_input[1, [0, 1, 3]]
    assert (other > 0).all() if cross == "attention" else (other == 0).all()


def test_future_bars_change_no_output_before_them():
    """The policy acts on a sequential sweep of a market and on the same market with every bar after `cut`
    replaced: the logits (hence the actions) at every bar up to `cut` are equal."""
    market = random_walk_market(T=160, S=4, seed=2, splits={"train": (30, 160)})
    cut = 80
    changed = _perturb_after(market, cut, seed=77)
    policy = trained(SymbolPolicy(4, set_input_shapes(cfg(), te.VecTradingCore(market, 1).observation_shapes)))
    runs = []
    for m in (market, changed):
        core = te.VecTradingCore(m, 2, mode="independent", seed=1, sequential=True)
        obs, record = core.reset(), []
        while True:
            with torch.no_grad():
                logits = policy.get_logits({k: torch.as_tensor(v) for k, v in obs.items()})
            obs, _, _, _, info = core.step(logits.argmax(-1).numpy())
            if int(info["bar"][0]) > cut:
                break
            record.append(logits)
        runs.append(record)
    assert len(runs[0]) == len(runs[1]) > 40
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not np.array_equal(changed.technical[cut + 1 :], market.technical[cut + 1 :])


def test_it_learns_a_hidden_leader_map():
    """Each symbol's target is its leader's last ret_1 (the lead-lag market's map of 6 symbols, never given): the
    block with its graph learns it and looks at the leader; the per-symbol network cannot."""
    S, leaders = 6, torch.as_tensor(lead_lag_leaders(6))
    losses = {}
    for cross in ("none", "attention"):
        torch.manual_seed(0)
        policy = SymbolPolicy(S, cfg(cross), shared_heads=True, hidden=(32,))
        opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
        for step in range(400):
            obs = random_observation(32, S, seed=step)
            loss = ((policy.get_value(obs) - obs["technical"][:, leaders, -1, 0]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        test = random_observation(256, S, seed=10_000)
        with torch.no_grad():
            losses[cross] = ((policy.get_value(test) - test["technical"][:, leaders, -1, 0]) ** 2).mean().item()
    assert losses["attention"] < 0.1 < 0.5 < losses["none"], losses  # the target's variance is 1
    with torch.no_grad():
        looks = policy.cross.attention_weights(policy.encoder(test), test["technical"])  # (256, heads, S, S)
    assert looks.shape == (256, 4, S, S)
    torch.testing.assert_close(looks.sum(-1), torch.ones(256, 4, S))
    assert torch.equal(looks.mean((0, 1)).argmax(-1), leaders)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and the training script
# ---------------------------------------------------------------------------------------------------------------


def test_a_checkpoint_rebuilds_with_the_block(tmp_path):
    """save_checkpoint -> load_symbol_agents (MAPPO's symbol agents): the block and its graph come back and the
    loaded agents act as the saved ones."""
    import ppo_symbol_agent as ppo

    args = ppo.Args()
    args.encoder = cfg(heads=2)
    agent = trained(SymbolPolicy(3, args.encoder, shared_heads=True))
    xp.save_checkpoint(tmp_path / "checkpoint.pt", agent, args=args)
    loaded, encoder = xp.load_symbol_agents(str(tmp_path / "checkpoint.pt"), 3, directive_dim=0)
    assert (encoder.cross_symbol, encoder.cross_symbol_heads, encoder.cross_symbol_graph) == ("attention", 2, True)
    assert loaded.cross is not None and torch.equal(loaded.cross.graph, agent.cross.graph)
    obs = random_observation(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().get_logits(obs), agent.get_logits(obs), rtol=0, atol=0)
    # a checkpoint from before the option (no cross_symbol fields in its args) rebuilds as "none"
    old = xp.load_checkpoint(tmp_path / "checkpoint.pt")
    old["args"]["encoder"] = {k: v for k, v in old["args"]["encoder"].items() if not k.startswith("cross_symbol")}
    old["model"] = {k: v for k, v in old["model"].items() if not k.startswith("cross.")}
    torch.save(old, tmp_path / "old.pt")
    assert xp.load_symbol_agents(str(tmp_path / "old.pt"), 3)[1].cross_symbol == "none"


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory):
    """ppo_symbol_agent.py with the block and --shared-heads, 2 iterations, checkpoints on."""
    cwd = tmp_path_factory.mktemp("cross")
    proc = run_script("ppo_symbol_agent.py", cwd, *TINY, *CROSS, "--shared-heads", "--total-timesteps", str(2 * ITER),
                      "--save-model", "--no-stress", "--eval-samples", "1")  # fmt: skip
    return cwd, proc, only_run(cwd / "runs")


def test_the_script_trains_and_evaluates_with_the_block(cross_run):
    cwd, proc, run = cross_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["args"]["shared_heads"] is True
    assert summary["args"]["encoder"]["cross_symbol"] == "attention"
    model = xp.load_checkpoint(run / "checkpoint.pt")["model"]
    assert model["cross.graph"].shape == (2, 3, 3) and model["actor.weights.0"].shape[0] == 1
    assert model["cross.out.weight"].abs().sum() > 0  # it trained (it starts at zero)
    # --eval-checkpoint rebuilds the block from the checkpoint, whatever this command's --encoder flags say
    evaluated = cwd / "eval"
    evaluated.mkdir()
    out = run_script("ppo_symbol_agent.py", evaluated, *TINY, "--eval-checkpoint", str(run / "best.pt"),
                     "--no-stress", "--eval-samples", "1")  # fmt: skip
    assert "evaluating" in out.stdout
    assert json.loads((only_run(evaluated / "runs") / "summary.json").read_text())["status"] == "complete"
    refused = run_script("ppo_symbol_agent.py", evaluated, *TINY, "--eval-checkpoint", str(run / "best.pt"),
                         "--explain", check=False)  # fmt: skip
    assert refused.returncode == 2 and "--explain" in refused.stderr and "Traceback" not in refused.stderr


def test_torchrun_two_processes_with_the_block(tmp_path):
    proc = run_script(
        "ppo_symbol_agent.py", tmp_path, *TINY, *CROSS, "--shared-heads", "--total-timesteps", str(4 * ITER),
        "--eval-interval", "0", "--no-stress", "--eval-samples", "1",
        launcher=["torchrun", "--standalone", "--nproc_per_node", "2"],
    )  # fmt: skip
    summary = json.loads((only_run(tmp_path / "runs") / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["args"]["world_size"] == 2
    assert summary["args"]["encoder"]["cross_symbol"] == "attention" and summary["global_step"] == 4 * ITER
    assert proc.stdout.count("final backtest on the test split") == 1  # the ranks agreed on the weights at the end
