"""Suite-wide setup and the test split.

Markers (registered in pyproject.toml) are applied here, at collection, so test files need not carry them:
  e2e          everything under tests/e2e/ (the service as its own process)
  gpu          everything under tests/gpu/, and any test marked gpu1 / gpu2 (CUDA GPUs needed)
  integration  real parts that are slow to start: everything under tests/integration/ and in
               tests/**/test_bench*.py (bench smoke runs); any test using
               a fixture in INTEGRATION_FIXTURES (the API on real Ray actors, a server process); and any
               test whose body (or a module-level helper it calls) spawns processes, opens a process
               group, starts Ray or uvicorn, runs a subprocess or a bench's main (REAL_PARTS below).
The fast subset is everything else:  python -m pytest -m "not integration and not e2e and not gpu"
The README's command (plain `python -m pytest`) runs all of it.
"""

from __future__ import annotations

import ast
import os
import re
from functools import cache
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent
DIR_MARKS = {"e2e": "e2e", "gpu": "gpu", "integration": "integration"}
#: Fixtures that start real parts: `client` (tests/api: the app on real Ray actors), `service` (a server process).
INTEGRATION_FIXTURES = {"client", "service"}
#: Files whose tests all start real parts another way: the RL example (a real server or gloo group), the
#: dashboard in real headless Chromium, the real trainer's stash with the tiny model.
INTEGRATION_FILES = {"test_rl_loop_example.py", "test_dashboard_browser.py", "test_compare_keeps_trainer.py"}
#: What a test (or a module helper it calls) does when it starts real parts.
REAL_PARTS = re.compile(r"\bmp\.spawn\(|\bspawn\(|\bsubprocess\.|\bopen_group\(|\bProcess\(|\bray\.init\(|"
                        r"\bLocalServer\(|\buvicorn\.|\bstart_processes\(|\b\w*bench\.main\(")


@cache
def _module_functions(path: str) -> tuple[str, dict[str, str]]:
    src = Path(path).read_text()
    funcs = {n.name: ast.get_source_segment(src, n) or "" for n in ast.parse(src).body
             if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    return src, funcs


def _starts_real_parts(path: str, name: str) -> bool:
    """The test function `name` of `path`, or a module-level function it reaches by name, matches REAL_PARTS."""
    _, funcs = _module_functions(path)
    todo, seen = [name], {name}
    while todo:
        body = funcs.get(todo.pop(), "")
        if REAL_PARTS.search(body):
            return True
        for word in set(re.findall(r"\b[A-Za-z_]\w*\b", body)):
            if word in funcs and word not in seen:
                seen.add(word)
                todo.append(word)
    return False


def _marks_for(item: pytest.Item) -> set[str]:
    path = Path(str(item.fspath)).resolve()
    marks: set[str] = set()
    try:
        top = path.relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        top = ""
    if top in DIR_MARKS:
        marks.add(DIR_MARKS[top])
    if path.name.startswith("test_bench") or path.name in INTEGRATION_FILES:  # bench smoke runs, real parts
        marks.add("integration")
    if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
        marks.add("integration")
    func = getattr(item, "originalname", None) or item.name.split("[")[0]
    if path.suffix == ".py" and _starts_real_parts(str(path), func):
        marks.add("integration")
    if "gpu1" in item.keywords or "gpu2" in item.keywords:
        marks.add("gpu")
    return marks


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for mark in sorted(_marks_for(item) - set(item.keywords)):
            item.add_marker(getattr(pytest.mark, mark))
