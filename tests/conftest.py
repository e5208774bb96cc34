"""Suite-wide settings (one torch thread, the repo root on sys.path) and the subprocess runner of the script tests."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # torch is in requirements.txt; the data tests alone do not need it
    pass


def script_env() -> dict:
    """The environment of a script run by the tests: one thread, unbuffered output, the repo importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def run_script(
    script: str, cwd: Path, *flags: str, check: bool = True, launcher: list[str] | None = None, timeout: float = 300
):
    """Run one of the repo's scripts as a user would (a subprocess in cwd); raise with its output if it fails."""
    env = script_env()
    cmd = (launcher or [sys.executable]) + [str(ROOT / script), *flags]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def only_run(folder: Path) -> Path:
    """The single run folder inside folder."""
    runs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def assert_real_png(path: Path, min_width: int = 600, min_height: int = 300) -> None:
    """path is a PNG of at least the given size that is not one flat colour (a blank figure)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= min_width and img.size[1] >= min_height, (path, img.size)
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 5, f"{path} is blank"
