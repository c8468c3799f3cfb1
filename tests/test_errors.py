"""Every error rasfx raises is a ``rasfx.RasfxError`` (keeping ``ValueError`` / ``TypeError``
compatibility where a plain Python error would be one), and its message names the fix."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import rasfx
from rasfx.runtime import GraphRunner
from reference_ras import make_sd3_tiny, sd3_inputs

ROOT = pathlib.Path(rasfx.__file__).parent
BUILTIN = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "Exception", "NotImplementedError"}
# raises that are deliberately the model's own error type: an argument the model does not take
ALLOWED = {("capture.py", "bind_inputs", "TypeError"), ("module.py", "_bind", "TypeError")}


def _plain_raises():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    name = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", None))
                    if name in BUILTIN and (path.name, func.name, name) not in ALLOWED:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {func.name}: raise {name}")
    return found


def test_no_plain_python_errors_in_the_package():
    assert _plain_raises() == []


def test_the_scan_finds_a_plain_raise(tmp_path, monkeypatch):
    """The scan above can fail: a module with a plain ``raise ValueError`` is reported."""
    (tmp_path / "bad.py").write_text("def f():\n    raise ValueError('x')\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _plain_raises() == ["bad.py:2 f: raise ValueError"]


def _pipe():
    from test_pipeline import build_sd3

    return build_sd3(0)[0]


@pytest.mark.parametrize("call, types, match", [
    (lambda: rasfx.enable(_pipe(), {"ratio": 0.5}), (rasfx.ArgumentTypeError, TypeError), "RASConfig"),
    (lambda: rasfx.enable(object(), rasfx.RASConfig()), (rasfx.UsageError, ValueError), "transformer"),
    (lambda: rasfx.disable(_pipe()), (rasfx.UsageError, ValueError), "not enabled"),
    (lambda: rasfx.stats(_pipe()), (rasfx.UsageError, ValueError), r"call pipe\(\.\.\.\)"),
    (lambda: rasfx.release(_pipe()), (rasfx.UsageError, ValueError), r"rasfx.enable"),
    (lambda: rasfx.transform(_pipe()), (rasfx.UnsupportedModelError,), r"rasfx.enable\(pipe"),
    (lambda: rasfx.explain("no-such-model"), (rasfx.UsageError, ValueError), "no-such-model"),
    (lambda: GraphRunner("fast"), (rasfx.ConfigError, ValueError), "mode must be one of"),
    (lambda: rasfx.transform(make_sd3_tiny(0)).cache_context("").__enter__(), (rasfx.UsageError,), "non-empty"),
    (lambda: rasfx.transform(make_sd3_tiny(0)).token_map(), (rasfx.UsageError,), "one forward first"),
])
def test_user_mistakes_raise_rasfx_errors(call, types, match):
    with pytest.raises(rasfx.RasfxError, match=match) as info:
        call()
    assert isinstance(info.value, types)


def test_inputs_the_model_itself_rejects_raise_the_models_error():
    """A user mistake that fails without rasfx too is reported as the model's error, not as a
    capture failure pointing at rasfx's limitations."""
    model = make_sd3_tiny(0)
    kw = sd3_inputs(3, 8, 8)
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"][:2]  # batch 3 latents, batch 2 prompts
    with pytest.raises(RuntimeError) as plain, torch.no_grad():
        model(**kw)
    with pytest.raises(type(plain.value)) as ours, torch.no_grad():
        rasfx.transform(model)(**kw)
    assert str(ours.value) == str(plain.value)
    assert any("without rasfx too" in n for n in getattr(ours.value, "__notes__", []))
