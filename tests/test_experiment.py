"""Tests of experiment.py, the run bookkeeping: checkpoints (round trip, mismatches, bad files), what --resume and
--eval-checkpoint accept, every form of MLFLOW_TRACKING_URI that --track meets, and the layout rule that the shared
modules import no script. The run folder, logging, resume, SIGINT and torchrun are exercised by running the scripts
(test_ppo_symbol_agent.py, test_mappo_master.py, test_reliability.py)."""

import dataclasses
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import script_env
from test_encoders import cfg, make_obs

from encoders import SymbolPolicy
from experiment import UserInputError, load_checkpoint, resolve_num_envs, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# 4 symbols x 2 envs x 32 steps = 256 symbol-steps a rollout, 2 rollouts; no SL fit, no cache, a short final report
TINY = ["--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1", "--eval-interval"]
TINY += ["0", "--data.no-sl-signals", "--data.no-cache", "--data.num-symbols", "4", "--data.years", "0.5"]
TINY += ["--no-stress", "--eval-samples", "1", "--total-timesteps", "512"]


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


# ---------------------------------------------------------------------------------------------------------------
# --track and MLFLOW_TRACKING_URI: every form a user sets, without the test opting in to MLflow's file store
# ---------------------------------------------------------------------------------------------------------------


def track(tmp_path: Path, uri: str) -> subprocess.CompletedProcess:
    """ppo_symbol_agent.py --track in tmp_path with MLFLOW_TRACKING_URI=uri, in an environment that does not set
    MLflow's file-store opt-in (the script has to), and no retries of an unanswered server."""
    env = {k: v for k, v in script_env().items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    env |= {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    cmd = [sys.executable, str(ROOT / "ppo_symbol_agent.py"), *TINY, "--track"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def read_back(monkeypatch, uri: str) -> None:
    """The run's metrics and params, read with MlflowClient (the test process opts in to read a file store)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "ppo_symbol_agent"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "policy_action_entropy_mean")
    assert len(history) == 2  # one point per iteration
    assert run.data.params["data.num_symbols"] == "4"


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: "), error
    for word in words:
        assert word in error, f"the error does not name {word!r}: {error}"


@pytest.mark.parametrize("form", ["path", "file:"])
def test_track_writes_a_file_store_named_by_a_path_or_a_file_uri(tmp_path, monkeypatch, form):
    """A relative folder or a file: URI (the form `file:/tmp/mlruns_x` once crashed after the run folder was made:
    MLflow 3 refuses file stores without its opt-in)."""
    store = tmp_path / "store"
    done = track(tmp_path, "store" if form == "path" else f"file:{store}")
    assert done.returncode == 0, done.stderr[-3000:]
    read_back(monkeypatch, store.as_uri())


def test_track_with_a_database_uri_logs_there(tmp_path, monkeypatch):
    """sqlite:///: the run is logged in the database and read back (SQLAlchemy and Alembic are dev requirements, so
    mlflow-skinny can use a database store)."""
    import alembic  # noqa: F401  a dev requirement: a missing install fails here
    import sqlalchemy  # noqa: F401

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = track(tmp_path, uri)
    assert done.returncode == 0, done.stderr[-3000:]
    read_back(monkeypatch, uri)


def test_a_database_store_without_sqlalchemy_is_one_line_naming_the_fix(monkeypatch):
    """With mlflow-skinny alone (no SQLAlchemy or Alembic) a database URI is refused before any work, naming the URI
    and the fix; file stores and servers need neither."""
    import experiment as xp

    real = xp.importlib.util.find_spec
    monkeypatch.setattr(xp.importlib.util, "find_spec", lambda m: None if m in ("sqlalchemy", "alembic") else real(m))
    with pytest.raises(
        xp.UserInputError, match=r"MLFLOW_TRACKING_URI=sqlite:///x.db is a database store.*pip install mlflow"
    ):
        xp.check_tracking_uri("sqlite:///x.db")
    xp.check_tracking_uri("file:/tmp/mlruns")
    xp.check_tracking_uri("http://127.0.0.1:5000")


def test_track_with_a_server_that_does_not_answer_fails_clearly(tmp_path):
    """An http:// server that is down: one line naming the URI, exit 2, and no run folder left incomplete."""
    done = track(tmp_path, "http://127.0.0.1:9")
    assert_one_line_error(done, "MLFLOW_TRACKING_URI=http://127.0.0.1:9", "--track")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# What --resume and --eval-checkpoint accept: the run's settings, data and feature set
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def market():
    from market_data import make_synthetic_prepared

    return make_synthetic_prepared(num_symbols=3, years=0.25, seed=0)


def run_checkpoint(path: Path, args, market, iteration: int = 1):
    """A checkpoint as save_run_checkpoint writes it for one process: the model, optimiser, args, the market's
    fingerprint and the RNG states. Returns the model and optimizer (for resume_run to load into)."""
    import experiment as xp

    model = SymbolPolicy(3, cfg("mlp"))
    optimizer = torch.optim.Adam(model.parameters())
    extra = {"iteration": iteration, "market": xp.market_fingerprint(market), "ranks": [{"rng": xp.rng_states()}]}
    save_checkpoint(path, model, optimizer, args=args, global_step=256 * iteration, extra=extra)
    return model, optimizer


def test_resume_names_every_changed_setting_and_refuses_it(tmp_path, market):
    import experiment as xp
    import ppo_symbol_agent as ppo
    from market_data import UserInputError

    saved = ppo.Args()
    model, optimizer = run_checkpoint(tmp_path / "checkpoint.pt", saved, market)
    path = str(tmp_path / "checkpoint.pt")

    def resume(args, allow=None):
        return xp.resume_run(path, model, optimizer, "cpu", 0, 1, market, 4, args=args, allow_mismatch=allow)

    # The bookkeeping flags may change: a longer run, another folder, MLflow, threads, the report's cut.
    free = dataclasses.replace(saved, total_timesteps=10**7, run_dir="elsewhere", track=True, torch_threads=4)
    free.stress, free.eval_samples, free.resume = False, 1, path
    free.data = dataclasses.replace(saved.data, cache=False, sl_threads=2)
    step, _, _, run_dir = resume(free)
    assert step == 256 and run_dir == tmp_path

    reward = dataclasses.replace(saved.env.reward, pnl_weight=0.5)
    other = dataclasses.replace(saved, learning_rate=1e-3, env=dataclasses.replace(saved.env, reward=reward))
    other.data = dataclasses.replace(saved.data, seed=7, sl_signals=False)
    with pytest.raises(UserInputError) as err:
        resume(other)
    message = str(err.value)
    for words in (
        "--data.seed 7 here, --data.seed 0 in its run",
        "--learning-rate 0.001 here, --learning-rate 0.0003 in its run",
        "--data.no-sl-signals here, --data.sl-signals in its run",
        "--env.reward.pnl-weight 0.5 here, --env.reward.pnl-weight 0.75 in its run",
    ):
        assert words in message, message
    assert "\n" not in message and "--total-timesteps" not in message
    # The error offers the override only to a script whose Args has it.
    assert ("--resume-allow-mismatch" in message) == hasattr(saved, "resume_allow_mismatch")
    assert "--resume-allow-mismatch" not in str(pytest.raises(UserInputError, resume, _Args(seed=2)).value)

    @dataclasses.dataclass
    class WithOverride(ppo.Args):
        resume_allow_mismatch: bool = False

    assert "--resume-allow-mismatch" in str(pytest.raises(UserInputError, resume, WithOverride(seed=2)).value)
    assert resume(WithOverride(seed=2, resume_allow_mismatch=True))[0] == 256  # the flag continues
    assert resume(other, allow=True)[0] == 256  # so does the parameter


def test_resume_refuses_other_data_even_without_the_settings(tmp_path, market, capsys):
    """Without args (or with equal data flags) the market's fingerprint still tells another market apart."""
    import experiment as xp
    from market_data import UserInputError, make_synthetic_prepared

    model, optimizer = run_checkpoint(tmp_path / "checkpoint.pt", {"seed": 1}, market)
    other = make_synthetic_prepared(num_symbols=3, years=0.25, seed=7)
    with pytest.raises(UserInputError, match=r"the data \(bars and features hash [0-9a-f]+ vs [0-9a-f]+"):
        xp.resume_run(str(tmp_path / "checkpoint.pt"), model, optimizer, "cpu", 0, 1, other, 4)
    xp.resume_run(str(tmp_path / "checkpoint.pt"), model, optimizer, "cpu", 0, 1, other, 4, allow_mismatch=True)
    assert "warning: --resume-allow-mismatch" in capsys.readouterr().out
    with pytest.raises(UserInputError, match="already finished"):
        xp.resume_run(str(tmp_path / "checkpoint.pt"), model, optimizer, "cpu", 0, 1, market, 1)


def test_resume_defaults_are_the_runs_settings(tmp_path, market):
    """The settings a resumed run gets when it takes its run's by default: the saved ones, each flag given on the
    command line over them, so that only those are compared (and refused)."""
    import tyro

    import experiment as xp
    import ppo_symbol_agent as ppo

    saved = ppo.Args(seed=5, total_timesteps=4096, learning_rate=1e-3, split="val", test_split="train")
    saved.data = dataclasses.replace(saved.data, seed=3, symbols=["SYN000", "SYN001"], sl_signals=False)
    saved.encoder = dataclasses.replace(saved.encoder, kind="mlp", d_model=64)
    run_checkpoint(tmp_path / "checkpoint.pt", saved, market)
    argv = ["--resume", str(tmp_path / "checkpoint.pt"), "--num-envs", "8"]
    assert xp.resume_defaults(ppo.Args, argv[2:]) is None
    args = tyro.cli(ppo.Args, args=argv, default=xp.resume_defaults(ppo.Args, argv))
    assert (args.seed, args.total_timesteps, args.learning_rate, args.split, args.num_envs) == (5, 4096, 1e-3, "val", 8)
    assert args.data == saved.data and args.encoder == saved.encoder and args.resume == argv[1]
    assert xp.setting_differences(xp._plain(saved), args) == [
        f"--num-envs 8 here, --num-envs {saved.num_envs} in its run"
    ]
    assert xp.resume_defaults(ppo.Args, ["--resume=" + argv[1]]).data.seed == 3
    # the run's encoder as saved, whatever `auto` means today: resolved again on CUDA, the seed transformer's fields
    # (equal to EncoderConfig's defaults) would become the small transformer and no longer fit the weights
    assert args.encoder_preset == "as_given"
    seed_size = dataclasses.replace(saved, encoder=dataclasses.replace(saved.encoder, kind="transformer", d_model=256))
    run_checkpoint(tmp_path / "seed.pt", seed_size, market)
    resumed = xp.resume_defaults(ppo.Args, ["--resume", str(tmp_path / "seed.pt")])
    assert xp.encoder_preset(resumed.encoder, resumed.encoder_preset, use_cuda=True)[0] == seed_size.encoder


def test_evaluation_refuses_another_feature_set(tmp_path, market):
    import experiment as xp
    import ppo_symbol_agent as ppo
    from market_data import DataConfig, UserInputError

    saved = ppo.Args()  # trained with the supervised signals and zscore features
    run_checkpoint(tmp_path / "checkpoint.pt", saved, market)
    path = str(tmp_path / "checkpoint.pt")
    same = DataConfig(source="elsewhere", seed=9, years=3.0)  # other bars are what evaluation is for
    assert xp.load_for_evaluation(path, market, "ppo_symbol_agent.py", data=same)["global_step"] == 256
    cases = {
        "--data.normalization minmax here, --data.normalization zscore in its run": {"normalization": "minmax"},
        "--data.no-sl-signals here, --data.sl-signals in its run": {"sl_signals": False},
        "--data.norm-window 70 here, --data.norm-window 140 in its run": {"norm_window": 70},
        "--data.sl-horizon 3 here, --data.sl-horizon 1 in its run": {"sl_horizon": 3},
    }
    for words, change in cases.items():
        with pytest.raises(UserInputError) as err:
            xp.load_for_evaluation(path, market, "ppo_symbol_agent.py", data=DataConfig(**change))
        assert words in str(err.value) and str(err.value).startswith(f"--eval-checkpoint {path} was trained on another")
    # Without the --data.* settings, the market shows whether the signals were fitted (this one has none).
    with pytest.raises(UserInputError, match="--data.no-sl-signals here, --data.sl-signals in its run"):
        xp.load_for_evaluation(path, market, "ppo_symbol_agent.py")
    with pytest.raises(UserInputError, match="--symbol-checkpoint .* another feature set: --data.normalization"):
        xp.load_symbol_agents(path, 3, market=market, data=DataConfig(normalization="robust"))


def test_peak_memory_is_the_process_own_high_water_mark():
    """peak_memory_mib: a process that held 400 MiB reports at least that, one that held little reports far less,
    whatever its parent held (a fresh interpreter, as the benchmarks' runs are)."""
    probe = "import experiment as xp{}; print(xp.peak_memory_mib())"
    hold = "; x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096])"
    run = lambda code: subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                      check=True).stdout  # fmt: skip
    held, little = float(run(probe.format(hold))), float(run(probe.format("")))
    assert held >= 400 and little < held - 350


def test_encoder_presets_fill_only_the_fields_left_at_their_defaults():
    """--encoder-preset: auto is the MLP on CPU and the small transformer on CUDA; small_transformer and
    small_lstm are the benchmarks' small transformer and LSTM on either device; a field the user set survives every
    preset."""
    from encoders import EncoderConfig
    from experiment import CPU_ENCODER, SMALL_LSTM_ENCODER, SMALL_TRANSFORMER_ENCODER, encoder_preset

    assert encoder_preset(EncoderConfig(), "auto", use_cuda=False) == (EncoderConfig(**CPU_ENCODER), "cpu")
    small_transformer = (EncoderConfig(**SMALL_TRANSFORMER_ENCODER), "small_transformer")
    assert encoder_preset(EncoderConfig(), "auto", use_cuda=True) == small_transformer
    assert encoder_preset(EncoderConfig(), "as_given", use_cuda=True) == (EncoderConfig(), "as_given")
    for cuda in (False, True):
        small, name = encoder_preset(EncoderConfig(), "small_transformer", use_cuda=cuda)
        assert name == "small_transformer" and small == EncoderConfig(**SMALL_TRANSFORMER_ENCODER)
    mine, _ = encoder_preset(EncoderConfig(num_layers=2), "small_transformer", use_cuda=False)
    assert mine.num_layers == 2 and mine.d_model == 64
    lstm, name = encoder_preset(EncoderConfig(), "small_lstm", use_cuda=False)
    assert name == "small_lstm" and lstm == EncoderConfig(**SMALL_LSTM_ENCODER) and lstm.kind == "lstm"
    wide, _ = encoder_preset(EncoderConfig(d_model=128), "small_lstm", use_cuda=True)
    assert wide.d_model == 128 and wide.alt_layers == 1


def test_num_envs_default_keeps_the_rollout_near_10k_symbol_steps():
    """--num-envs left out: 16 envs up to 10 symbols (the defaults the learning table measured), fewer above, at least
    1; a given value is kept; the minibatch check runs against the resolved value."""

    def resolved(num_symbols, num_envs=None, num_steps=64, num_minibatches=4):
        args = SimpleNamespace(num_envs=num_envs, num_steps=num_steps, num_minibatches=num_minibatches)
        return resolve_num_envs(args, num_symbols), args.num_envs

    assert [resolved(s)[0] for s in (1, 3, 10, 20, 50, 143, 500)] == [16, 16, 16, 8, 3, 1, 1]
    assert resolved(143, num_envs=16) == (16, 16)
    assert resolved(143) == (1, 1)  # written back, so that the run's settings record it
    with pytest.raises(UserInputError, match=r"--num-minibatches \(3\) must divide num_steps \* num_envs \(64\)"):
        resolved(143, num_minibatches=3)
