"""Tests of encoders.py: encoder shapes for every kind, masking in SymbolPolicy, batched heads, parameter budgets,
the master network, and that the module holds networks only. Small batches and one thread keep the file within
seconds on 2 cores. Masked sampling is the scripts' and is tested in test_ppo_symbol_agent.py; checkpoints are
experiment.py's (test_experiment.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import encoders
from encoders import (
    NUM_DIRECTIVES,
    EncoderConfig,
    FeatureEncoder,
    MasterNetwork,
    SymbolPolicy,
    count_parameters,
    make_encoder,
    random_observation,
    unravel_directive,
    weight_sharing_report,
)

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["transformer", "lstm", "cnn", "mlp"]
torch.set_num_threads(1)


make_obs = random_observation


def cfg(kind, **kw):
    return EncoderConfig(kind=kind, dropout=0.0, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_encoder_shapes_and_finite(kind, batch):
    enc = make_encoder(EncoderConfig(kind=kind)).eval()
    with torch.no_grad():
        out = enc(make_obs(batch))
        out_bs = enc(make_obs(batch, 2))  # (B, S, ...) leading dims are flattened and restored
    assert out.shape == (batch, 256)
    assert out_bs.shape == (batch, 2, 256)
    assert torch.isfinite(out).all() and torch.isfinite(out_bs).all()


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_batch_independence(kind):
    enc = make_encoder(EncoderConfig(kind=kind)).eval()
    obs = make_obs(5, seed=1)
    with torch.no_grad():
        full = enc(obs)
        for i in range(5):
            one = enc({k: v[i : i + 1] for k, v in obs.items()})
            torch.testing.assert_close(one[0], full[i], rtol=1e-5, atol=1e-5)
        # Changing sample 0 must leave the others untouched.
        obs2 = {k: v.clone() for k, v in obs.items()}
        obs2["technical"][0] += 1.0
        changed = enc(obs2)
    assert not torch.allclose(changed[0], full[0])
    torch.testing.assert_close(changed[1:], full[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_every_parameter(kind):
    policy = SymbolPolicy(2, cfg(kind), directive_dim=4)
    logits, value = policy(make_obs(3, 2, directives=4))
    (torch.log_softmax(logits, -1)[..., 0].sum() + value.sum()).backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_transformer_layout_and_sequence_output():
    c = EncoderConfig()
    assert (c.d_model, c.nhead, c.num_layers, c.dim_feedforward, c.dropout, c.output_dim) == (256, 8, 4, 1024, 0.1, 256)
    enc = FeatureEncoder(c).eval()
    assert all(layer.norm_first for layer in enc.layers)  # pre-LN
    with torch.no_grad():
        seq = enc(make_obs(2, 3), return_sequence=True)
    assert seq.shape == (2, 3, 28, 256)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_zero_is_deterministic_in_train_mode(kind):
    """PPO builds the encoder with dropout=0.0 so that train-mode log-probs equal the rollout's."""
    enc = make_encoder(cfg(kind)).train()
    obs = make_obs(3, 2)
    assert torch.equal(enc(obs), enc(obs))
    single = enc({k: v[0, 0] for k, v in obs.items()})  # no leading dims at all
    assert single.shape == (256,)
    torch.testing.assert_close(single, enc(obs)[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_encoder_layer_is_the_torch_layer_with_its_gradients(train):
    """encoders.encoder_layer (the transformer's short path without dropout) gives nn.TransformerEncoderLayer's output
    and the same gradients for every weight and for the input; with dropout in train mode the encoder keeps torch's
    layer (so the seed's dropout 0.1 still applies)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True, norm_first=True).train(train)
    x = torch.randn(5, 7, 32, requires_grad=True)
    ours = encoders.encoder_layer(layer, x)
    grads = torch.autograd.grad(ours.square().sum(), [x, *layer.parameters()])
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    for other in (dict(norm_first=False), dict(activation="gelu")):  # layouts the short path does not cover
        odd = nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True, **({"norm_first": True} | other))
        torch.testing.assert_close(encoders.encoder_layer(odd, x), odd(x))
    enc = FeatureEncoder(EncoderConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.5)).train()
    obs = make_obs(2, 3)
    assert not torch.equal(enc(obs), enc(obs))  # torch's layer with its dropout
    enc.eval()  # no dropout: the short path, equal to torch's layers applied one by one
    x, _ = enc.tokens(obs)
    for torch_layer in enc.layers:
        x = torch_layer(x)
    expected = enc.output_proj(enc.norm(x).mean(1)).reshape(2, 3, -1)
    torch.testing.assert_close(enc(obs), expected, rtol=1e-5, atol=1e-5)


def test_attention_weights_rows_sum_to_one():
    enc = FeatureEncoder(EncoderConfig()).eval()
    w = enc.get_attention_weights(make_obs(2, 3))
    assert w.shape == (2, 3, 4, 8, 28, 28)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 4, 8, 28))


def test_bad_inputs_raise_clear_errors():
    enc = make_encoder(EncoderConfig(kind="mlp"))
    obs = make_obs(2)
    with pytest.raises(ValueError, match="technical"):
        enc({**obs, "technical": torch.zeros(2, 20, 23)})
    with pytest.raises(ValueError, match="regime"):
        enc({**obs, "regime": torch.zeros(2, 9)})
    with pytest.raises(KeyError, match="position"):
        enc({k: v for k, v in obs.items() if k != "position"})
    with pytest.raises(ValueError, match="kind"):
        make_encoder(EncoderConfig(kind="gru"))
    policy = SymbolPolicy(3, cfg("mlp"))
    with pytest.raises(ValueError, match="symbols"):
        policy.get_value(make_obs(2, 4))


def test_directives_change_the_heads_not_the_encoder():
    policy = SymbolPolicy(2, cfg("mlp"), directive_dim=4).eval()
    obs = make_obs(3, 2, directives=4)
    other = {**obs, "directives": obs["directives"] + 1.0}
    with torch.no_grad():
        assert torch.equal(policy.embed(obs), policy.embed(other))
        assert not torch.allclose(policy.get_value(obs), policy.get_value(other))
    with pytest.raises(KeyError, match="directives"):
        policy.get_value({k: v for k, v in obs.items() if k != "directives"})


# ---------------------------------------------------------------------------------------------------------------
# Batched heads
# ---------------------------------------------------------------------------------------------------------------


def _loop_heads(batched, symbol):
    """Plain nn.Linear layers holding symbol `symbol`'s weights of a BatchedMLP."""
    layers = []
    for w, b in zip(batched.weights, batched.biases, strict=True):
        lin = nn.Linear(w.shape[1], w.shape[2])
        with torch.no_grad():
            lin.weight.copy_(w[symbol].T)
            lin.bias.copy_(b[symbol])
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_einsum_heads_equal_per_symbol_loop():
    S = 5
    policy = SymbolPolicy(S, cfg("mlp"), directive_dim=4).eval()
    with torch.no_grad():  # non-zero biases so the test also covers them
        for b in [*policy.actor.biases, *policy.critic.biases]:
            b.normal_()
    obs = make_obs(7, S, directives=4)
    with torch.no_grad():
        z = policy._head_input(obs)  # (7, S, 260)
        logits = policy.actor(z)
        value = policy.critic(z)
        for s in range(S):
            torch.testing.assert_close(logits[:, s], _loop_heads(policy.actor, s)(z[:, s]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(value[:, s], _loop_heads(policy.critic, s)(z[:, s]), rtol=1e-5, atol=1e-5)
    # Heads differ between symbols (independent orthogonal draws).
    assert not torch.allclose(policy.actor.weights[0][0], policy.actor.weights[0][1])


def test_shared_heads_accept_any_symbol_count():
    policy = SymbolPolicy(3, cfg("mlp"), shared_heads=True).eval()
    assert policy.actor.weights[0].shape[0] == 1
    with torch.no_grad():
        v = policy.get_value(make_obs(2, 11))
        same = policy.get_value({k: x[:, :1].expand_as(x) for k, x in make_obs(2, 11).items()})
    assert v.shape == (2, 11)
    torch.testing.assert_close(same, same[:, :1].expand_as(same))  # same input, same head -> same value


def test_head_initialisation():
    policy = SymbolPolicy(2, cfg("mlp"), actor_gain=0.1)
    w_hidden = policy.actor.weights[0][1].T  # (256, 256) in nn.Linear layout
    torch.testing.assert_close(w_hidden @ w_hidden.T, 2.0 * torch.eye(256), atol=1e-4, rtol=0)  # gain sqrt(2)
    w_out = policy.actor.weights[-1][0].T  # (7, 128): rows orthogonal with norm 0.1
    torch.testing.assert_close(w_out @ w_out.T, 0.01 * torch.eye(7), atol=1e-5, rtol=0)
    w_v = policy.critic.weights[-1][0].T  # (1, 128)
    assert w_v.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert all((b == 0).all() for b in policy.actor.biases)


# ---------------------------------------------------------------------------------------------------------------
# Parameter budgets and weight sharing
# ---------------------------------------------------------------------------------------------------------------


def test_parameter_budget():
    c = EncoderConfig()
    enc = make_encoder(c)
    assert count_parameters(enc) < 5_000_000
    one = SymbolPolicy(1, c)
    assert count_parameters(one) < 10_000_000
    report = weight_sharing_report(143, c)
    assert report["encoder"] == count_parameters(enc)
    assert report["one_agent"] == count_parameters(one)
    assert report["shared_encoder_total"] < 50_000_000
    assert report["no_sharing_total"] == 143 * report["one_agent"]
    assert report["saving_fraction"] > 0.6


def test_sharing_report_matches_a_built_policy():
    c = cfg("mlp")
    report = weight_sharing_report(6, c, directive_dim=4)
    assert report["shared_encoder_total"] == count_parameters(SymbolPolicy(6, c, directive_dim=4))
    assert report["shared_heads_total"] == count_parameters(SymbolPolicy(6, c, directive_dim=4, shared_heads=True))
    assert math.isclose(report["saving_fraction"], 1 - report["shared_encoder_total"] / report["no_sharing_total"])


# ---------------------------------------------------------------------------------------------------------------
# Master network
# ---------------------------------------------------------------------------------------------------------------


def test_master_shapes_pooling_and_gradients():
    policy = SymbolPolicy(5, cfg("mlp"))
    master = MasterNetwork(embed_dim=256, global_dim=12, state_dim=9)
    emb = policy.embed(make_obs(3, 5))  # (3, 5, 256)
    g, state = torch.randn(3, 12), torch.randn(3, 9)
    logits, value = master(emb, g, state)
    assert logits.shape == (3, NUM_DIRECTIVES) and value.shape == (3,)
    (torch.log_softmax(logits, -1)[:, 0].sum() + value.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in master.parameters())
    assert policy.encoder.net[0].weight.grad is not None  # embeddings not detached here: the encoder learns too
    with torch.no_grad():
        # Pooling is symmetric in the symbols and a symbol mask equals dropping the masked symbols.
        perm = torch.randperm(5)
        torch.testing.assert_close(master.get_value(emb[:, perm], g, state), master.get_value(emb, g, state))
        mask = torch.tensor([True, True, False, True, False]).expand(3, 5)
        torch.testing.assert_close(
            master.get_value(emb, g, state, symbol_mask=mask), master.get_value(emb[:, [0, 1, 3]], g, state)
        )
        # The critic sees the global state; the actor does not.
        logits, _ = master(emb, g, state)
        logits2, _ = master(emb, g, state + 1)
        assert torch.equal(logits, logits2)
        assert not torch.allclose(master.get_value(emb, g, state), master.get_value(emb, g, state + 1))
    with pytest.raises(ValueError, match="state"):
        master.get_value(emb.detach(), g)


def test_unravel_directive():
    coords = unravel_directive(torch.arange(NUM_DIRECTIVES))
    assert coords.shape == (NUM_DIRECTIVES, 3) == (60, 3)
    assert coords.amax(0).tolist() == [4, 3, 2]
    assert len({tuple(c) for c in coords.tolist()}) == NUM_DIRECTIVES
    # the networks' grid is the environment's (encoders.py imports no environment code, so both write it out)
    import trading_env

    assert encoders.DIRECTIVE_SHAPE == trading_env.DIRECTIVE_SHAPE and NUM_DIRECTIVES == trading_env.NUM_DIRECTIVES
    expected = np.stack(np.unravel_index(np.arange(NUM_DIRECTIVES), trading_env.DIRECTIVE_SHAPE), 1)
    np.testing.assert_array_equal(coords.numpy(), expected)


# ---------------------------------------------------------------------------------------------------------------
# Layout: networks only
# ---------------------------------------------------------------------------------------------------------------


def test_encoders_imports_networks_only():
    """encoders.py imports no tensorboard, MLflow, signal-handling or distributed code (DESIGN.md section 1)."""
    import ast

    tree = ast.parse((ROOT / "encoders.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    assert names <= {"__future__", "copy", "math", "dataclasses", "typing", "torch", "torch.nn"}, names


def test_factored_master_head_log_probabilities_sum_correctly():
    """The joint log-probabilities of the factored head are the sum of its three heads' log-probabilities: they
    normalise over the 60 directives, their marginals are the heads' softmaxes, and the joint entropy is the sum of
    the heads' entropies."""
    torch.manual_seed(0)
    heads = torch.randn(5, sum(encoders.DIRECTIVE_SHAPE)) * 3.0
    joint = encoders.joint_logprobs(heads)  # (5, 60)
    torch.testing.assert_close(joint.exp().sum(-1), torch.ones(5))
    p = joint.exp().reshape(5, *encoders.DIRECTIVE_SHAPE)
    r, c, m = torch.split(heads, encoders.DIRECTIVE_SHAPE, -1)
    torch.testing.assert_close(p.sum((2, 3)), torch.softmax(r, -1))
    torch.testing.assert_close(p.sum((1, 3)), torch.softmax(c, -1))
    torch.testing.assert_close(p.sum((1, 2)), torch.softmax(m, -1))
    index = encoders.unravel_directive(torch.tensor(23))  # risk 1, level 3, mode 2
    expected = sum(torch.log_softmax(h, -1)[:, int(i)] for h, i in zip((r, c, m), index, strict=True))
    torch.testing.assert_close(joint[:, 23], expected)
    entropy = torch.distributions.Categorical(logits=joint).entropy()
    heads_entropy = sum(torch.distributions.Categorical(logits=h).entropy() for h in (r, c, m))
    torch.testing.assert_close(entropy, heads_entropy)
    master = MasterNetwork(embed_dim=8, global_dim=3)
    logits, _ = master(torch.randn(4, 6, 8), torch.randn(4, 3))
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(4))
    h = master.head_entropies(torch.randn(4, 6, 8), torch.randn(4, 3))
    assert h.shape == (4, 3) and ((h > 0.9) & (h <= 1.0 + 1e-6)).all()  # small initial logits: near uniform heads


def test_pinned_heads_fix_their_coordinates_and_keep_the_free_head():
    """pin_heads(d, (1, 2)): every directive the master can pick has d's concentration level and mode, the joint
    probabilities still sum to 1, the pinned heads have entropy 0 and no gradient, the risk head stays free, and the
    pins travel with the weights."""
    torch.manual_seed(0)
    master = MasterNetwork(16, 5)
    emb, glob = torch.randn(64, 3, 16), torch.randn(64, 5)
    d = int(np.ravel_multi_index((3, 2, 0), encoders.DIRECTIVE_SHAPE))
    master.pin_heads(d, heads=(1, 2))
    assert master.free_heads() == [True, False, False]
    logits, _ = master(emb, glob)
    p = logits.exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(64))
    coords = unravel_directive(torch.distributions.Categorical(logits=logits).sample((20,)))
    assert (coords[..., 1] == 2).all() and (coords[..., 2] == 0).all()
    assert len(torch.unique(coords[..., 0])) > 1  # the risk head still chooses
    ent = master.head_entropies(emb, glob)
    assert (ent[:, 1:] == 0).all() and (ent[:, 0] > 0).all()
    ent[:, 1:].sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in master.actor.parameters())
    again = MasterNetwork(16, 5)
    again.load_state_dict(master.state_dict())
    assert again.free_heads() == [True, False, False]
    with pytest.raises(ValueError, match="factored"):
        MasterNetwork(16, 5, factored=False).pin_heads(d, heads=(1,))
