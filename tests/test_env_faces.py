"""The gymnasium, gymnasium-vector and PettingZoo faces of the trading core: API checkers, MaskablePPO, autoreset."""

from __future__ import annotations

import numpy as np
import pytest
from test_trading_env import make_market, masked_random_actions

import trading_env as te


@pytest.fixture(scope="module")
def market():
    return make_market(T=400, S=4, seed=21, splits={"train": (30, 300), "val": (330, 400)})


def test_trading_environment_passes_check_env(market):
    from gymnasium.utils.env_checker import check_env

    env = te.TradingEnvironment(market, symbol="SYN001", config=te.EnvConfig(episode_length=50))
    check_env(env, skip_render_check=True)


def test_trading_environment_episode_and_errors(market):
    env = te.TradingEnvironment(market, symbol=0, config=te.EnvConfig(episode_length=20), seed=1)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    rng = np.random.default_rng(0)
    n, done = 0, False
    while not done:
        mask = env.action_masks()
        assert mask[te.HOLD] and mask.dtype == bool
        obs, r, term, trunc, info = env.step(int(rng.choice(np.flatnonzero(mask))))
        assert isinstance(r, float) and env.observation_space.contains(obs)
        n, done = n + 1, term or trunc
    assert n == 20 and trunc and not term
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    env.reset()
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        env.step(9)
    with pytest.raises(TypeError, match="integer"):
        env.step(1.5)


def test_maskable_ppo_trains_on_trading_environment(market):
    import sb3_contrib  # a dev requirement: a missing install fails here

    env = te.TradingEnvironment(market, symbol=0, config=te.EnvConfig(episode_length=64))
    model = sb3_contrib.MaskablePPO(
        "MultiInputPolicy", env, n_steps=128, batch_size=64, n_epochs=1, seed=0, verbose=0, device="cpu"
    )
    model.learn(total_timesteps=256)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, action_masks=env.action_masks(), deterministic=True)
    assert env.action_masks()[int(action)]


def test_vector_env_shapes_and_same_step_autoreset(market):
    import gymnasium as gym

    venv = te.TradingVectorEnv(market, num_envs=2, config=te.EnvConfig(episode_length=10), seed=0)
    assert venv.num_envs == 8
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    obs, _ = venv.reset(seed=0)
    assert venv.observation_space.contains(obs)
    assert obs["technical"].shape == (8, 24, 23) and obs["action_mask"].dtype == np.int8
    rng = np.random.default_rng(0)
    for _ in range(10):
        actions = masked_random_actions(rng, venv.action_masks()[None].astype(np.int8))[0]
        obs, r, term, trunc, info = venv.step(actions)
        assert r.shape == (8,) and info["executed_action"].shape == (8,)
    assert trunc.all() and info["_final_obs"].all()
    assert info["episode"]["done_mask"].all() and (info["episode"]["length"] == 10).all()
    assert (obs["portfolio"][:, 0] == 1.0).all()  # new episodes, fresh capital
    assert venv.single_observation_space.contains({k: v[0] for k, v in info["final_obs"].items()})
    with pytest.raises(ValueError, match="shape"):
        venv.step(np.zeros(3, int))


def test_portfolio_parallel_env_api(market):
    from pettingzoo.test import parallel_api_test

    env = te.PortfolioParallelEnv(market, config=te.EnvConfig(episode_length=30), seed=0)
    parallel_api_test(env, num_cycles=100)


def test_portfolio_parallel_env_state_and_directives(market):
    env = te.PortfolioParallelEnv(market, config=te.EnvConfig(episode_length=30), seed=0)
    obs, infos = env.reset(seed=1)
    assert set(obs) == set(market.data.symbols) and "directives" in obs["SYN000"]
    st = env.state()
    assert env.state_space.contains(st)
    env.set_directive((2 * 4 + 1) * 3 + 0)  # defensive: no BUY_LARGE, no ADD
    assert env.core.obs["action_mask"][0, :, te.BUY_LARGE].sum() == 0
    env.set_directive((2 * 4 + 1) * 3 + 2)
    assert env.core.obs["action_mask"][0, :, te.BUY_LARGE].sum() == 4
    steps = 0
    while env.agents:
        obs, rew, term, trunc, infos = env.step({a: te.HOLD for a in env.agents})
        steps += 1
    assert steps == 30 and all(trunc.values()) and not any(term.values())
    with pytest.raises(RuntimeError, match="reset"):
        env.step({a: 0 for a in env.possible_agents})
