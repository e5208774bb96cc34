"""The documentation's Python examples run as written: every ```python block of the README and docs/*.md is
executed in a fresh namespace, in a temporary folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = [(page, i, code) for page in PAGES for i, code in enumerate(BLOCK.findall(page.read_text()))]


def test_the_docs_hold_python_examples():
    assert EXAMPLES, "no ```python block found in README.md or docs/"


@pytest.mark.parametrize(("page", "index", "code"), EXAMPLES, ids=[f"{p.name}-{i}" for p, i, _ in EXAMPLES])
def test_python_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page.name} example {index}", "exec"), {"__name__": "__docs__"})
