"""`import refdecode` is lazy (PEP 562): its public names are imported on first use, so that the corpus modules a Ray
worker imports to run a build's tasks, and `import refdecode` itself, load neither torch nor transformers; every
public name, and every submodule as an attribute, still works as before."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import refdecode

REPO = Path(__file__).resolve().parents[1]

# every module whose functions a Ray build's tasks run, or which those import
RAY_TASK_MODULES = (
    "refdecode.corpus.ray_build",
    "refdecode.corpus.chunking",
    "refdecode.corpus.dedup",
    "refdecode.corpus.embedding",
    "refdecode.corpus.spans",
    "refdecode.corpus.index",
    "refdecode.corpus.format",
    "refdecode.corpus.npyfile",
    "refdecode.corpus.passage_index",
    "refdecode.checked_folder",
)


def heavy_modules_after(statement: str) -> list[str]:
    """The heavy packages (torch, transformers) that `statement` imports, in a fresh interpreter."""
    heavy = "[m for m in ('torch', 'transformers') if m in sys.modules]"
    code = f"{statement}\nimport json, sys\nprint(json.dumps({heavy}))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement", ["import refdecode", f"import {', '.join(RAY_TASK_MODULES)}"])
def test_import_loads_neither_torch_nor_transformers(statement):
    assert heavy_modules_after(statement) == []


def test_the_first_public_name_used_imports_its_module():
    assert "torch" in heavy_modules_after("from refdecode import generate")


def test_every_public_name_is_its_modules_own():
    for name in refdecode.__all__:
        value = getattr(refdecode, name)
        module = importlib.import_module(refdecode._WHERE[name], "refdecode")
        assert value is getattr(module, name), name
    assert set(refdecode._WHERE) == set(refdecode.__all__)
    assert set(refdecode.__all__) <= set(dir(refdecode)) and "__version__" in dir(refdecode)
    namespace: dict = {}
    exec("from refdecode import *", namespace)
    assert set(refdecode.__all__) <= set(namespace)
    assert refdecode.__version__ == "0.1.0"


def test_submodules_are_attributes_and_unknown_names_are_attribute_errors():
    assert refdecode.drafters.RecycleDrafter is refdecode.RecycleDrafter
    assert refdecode.models.load_model is refdecode.load_model
    with pytest.raises(AttributeError, match=r"^module 'refdecode' has no attribute 'no_such_name'$"):
        refdecode.no_such_name  # noqa: B018
    assert not hasattr(refdecode, "_private_nothing") and not hasattr(refdecode, "no_such_module")
    with pytest.raises(ImportError, match="cannot import name 'no_such_name'"):
        exec("from refdecode import no_such_name", {})


def test_cli_help_and_index_commands_still_parse():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for argv in (["--help"], ["index", "build", "--help"], ["index", "info", "--help"]):
        code = "import sys; from refdecode.cli import main; sys.exit(main())"
        result = subprocess.run(
            [sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and "usage: refdecode" in result.stdout, (argv, result.stderr[-2000:])
