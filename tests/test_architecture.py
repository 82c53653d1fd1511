"""The import graph (tools/check_imports.py, also run by ``make lint``): no cycle once
function-level imports count, and every module imports only its own layer and the ones
below (config < storage < models < task types < training < library < stages < flows)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools/check_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_and_every_import_within_its_layers():
    problems = _checker().check()
    assert problems == [], "\n".join(problems)


def test_the_checker_sees_the_stages_and_names_a_broken_rule(tmp_path, monkeypatch):
    """It reads the package-dir mapping (tasks/ is domaintune.tasks), and a library module
    that imports a stage, or a cycle through a function-level import, is named with its
    file and line."""
    checker = _checker()
    files = checker.module_files()
    assert files["domaintune.tasks.finetune"] == ROOT / "tasks/finetune.py"
    assert files["domaintune.flows.retrain"] == ROOT / "flows/retrain.py"
    fake = tmp_path / "predict.py"
    fake.write_text(
        "def f():\n    from domaintune.tasks.evaluate import evaluate\n"
        "    from domaintune.cli import main\n"
    )
    monkeypatch.setattr(
        checker, "module_files", lambda: {**files, "domaintune.serving.predict": fake}
    )
    problems = checker.check()
    assert any(
        "predict.py:2 (in a function): domaintune.serving.predict (library) imports "
        "domaintune.tasks.evaluate (stages)" in p
        for p in problems
    ), problems
    assert any(
        p.startswith("import cycle of") and "domaintune.serving.predict" in p for p in problems
    )


def test_make_lint_runs_the_checker():
    makefile = (ROOT / "Makefile").read_text()
    assert "tools/check_imports.py" in makefile.split("\nlint:")[1].split("\n\n")[0]
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools/check_imports.py")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout
    assert "no cycle" in out.stdout


def test_the_config_schema_offers_the_task_types_it_does_not_import():
    """The config package knows no task type; the registry gives the Prefect form its
    drop-down when it is imported (every flow imports it)."""
    import domaintune.flows.retrain  # noqa: F401
    from domaintune.config import RetrainConfig
    from domaintune.tasktypes import task_type_names

    schema = RetrainConfig.model_json_schema()
    assert schema["$defs"]["TaskConfig"]["properties"]["type"]["enum"] == task_type_names()
