"""The package ships ``py.typed``: ``mypy -p rasfx`` reports no errors at the strictness that
``[tool.mypy]`` in pyproject.toml sets (docs/reliability.md, "Type checking").

mypy keeps its cache in the repository's ``.mypy_cache`` (git-ignored): the first run analyses
the imported torch too (about 20 s on 2 CPU cores), later runs only what changed (under 1 s
when nothing did).
"""

import pathlib
import tomllib

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[test]')")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_strictness_is_the_documented_one():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config.get("check_untyped_defs") is True
    assert config.get("ignore_errors") is not True and config.get("ignore_missing_imports") is not True


def test_mypy_reports_no_errors(monkeypatch):
    # mypy finds the package from the current directory first: this checkout's rasfx, not an installed one
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = mypy_api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "rasfx"]
    )
    assert status == 0, f"mypy -p rasfx found errors:\n{stdout}{stderr}"
    assert stdout.startswith("Success: no issues found"), stdout
