"""The repository installs as a distribution of flat modules (pyproject.toml): a wheel built offline holds the shared
modules and the scripts and no folder (runs/, tests/, benchmarks/, docs/), its dependencies are requirements.txt's
lines, and the modules import from another folder with only the installed files on the path."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("market_data", "trading_env", "backtest", "encoders", "experiment")
SCRIPTS = ("ppo_symbol_agent", "mappo_master", "validate_stage5")
FOLDERS = ("runs", "tests", "benchmarks", "docs")
# Local state that a copy of the tree does not need (caches, stores, earlier builds).
SKIP = shutil.ignore_patterns(
    ".git", ".cache", ".venv", ".hypothesis", "mlruns", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the checkout with a runs/ folder that holds a run (with it, `pip install .` once built a wheel named
    runs and nothing else)."""
    tree = tmp_path_factory.mktemp("tree") / "repo"
    shutil.copytree(ROOT, tree, ignore=SKIP)
    run = tree / "runs" / "ppo_symbol_agent__synthetic__1__0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}\n")
    (tree / "runs" / "__init__.py").write_text("")
    return tree


@pytest.fixture(scope="module")
def wheel(tree, tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built offline from the copy."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)]
    proc = subprocess.run([*cmd, str(tree)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (whl,) = out.glob("*.whl")
    return whl


def test_the_wheel_holds_the_modules_and_no_folder(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top == {f"{m}.py" for m in MODULES + SCRIPTS}, f"{wheel.name} holds {sorted(top)}"
    assert not any(name.startswith(tuple(f"{f}/" for f in FOLDERS)) for name in names)
    assert not wheel.name.startswith("runs")


def test_the_dependencies_are_requirements_txt(wheel):
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        lines = z.read(meta).decode().splitlines()
    requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    assert requires == requirement_lines(ROOT / "requirements.txt")
    assert "Requires-Python: >=3.10" in lines


def import_elsewhere(python: str, tmp_path: Path, pythonpath: str = "") -> list[Path]:
    """Import every module with `python` in an empty folder outside the checkout; the files the modules came from."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import " + ", ".join(MODULES + SCRIPTS) + "; print(trading_env.__file__, experiment.__file__)"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([python, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [Path(p) for p in proc.stdout.split()]


def test_the_installed_modules_import_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:  # a pure-Python wheel installs by unpacking (pip install --target does this)
        z.extractall(target)
    files = import_elsewhere(sys.executable, tmp_path, pythonpath=str(target))
    assert all(f.parent == target for f in files), files


def test_an_editable_install_imports_from_another_folder(tree, tmp_path):
    """`pip install -e .` (PEP 660) into a virtual environment: the modules import from elsewhere, from the tree."""
    venv = tmp_path / "venv"  # the interpreter's own packages (torch, setuptools, pip) stay visible: no download
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    cmd = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(tree)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install -e failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    files = import_elsewhere(python, tmp_path)
    assert all(f.parent == tree for f in files), files
