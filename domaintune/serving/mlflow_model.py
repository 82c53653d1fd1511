"""A registered version as an MLflow model, served by MLflow's own model server.

    domaintune serve-model NAME@production --port 5001          # mlflow models serve
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"text": "Operating profit rose"}]}'

Why MLflow's server and not a home-made one: MLflow is already installed with domaintune's
tracking, its ``pyfunc`` format is what Databricks, SageMaker, Azure ML and KServe's MLServer
take, ``mlflow models build-docker`` turns the same folder into an image, and its REST
schema (``/invocations`` with ``dataframe_split`` / ``dataframe_records`` / ``inputs``,
``/ping``, ``/health``, ``/version``) is documented and known to client code. BentoML,
LitServe or Ray Serve would each be a new dependency tree for the same FastAPI-on-uvicorn
server.

The pyfunc (:class:`DomaintuneModel`) wraps the version folder (``config.yaml``, ``model/``,
``exports/``) copied in as an artifact, and predicts with ``domaintune predict``'s own code
(the task type's ``predict``, the same runtime choice: the fastest verified ONNX export where
the version has one): a request's rows get the same columns as ``domaintune predict`` writes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

log = logging.getLogger(__name__)

#: the artifact name of the version folder inside the MLflow model
ARTIFACT = "version"
#: the artifact name of an export that is not inside the version folder (made later)
EXPORT = "export"


class DomaintuneModel(mlflow.pyfunc.PythonModel):
    """A domaintune registry version behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from domaintune.serving.predict import _load, _served, choose_runtime, resolve

        config = getattr(context, "model_config", None) or {}
        self.model = resolve(context.artifacts[ARTIFACT])
        runtime = config.get("runtime", "auto")
        if EXPORT in context.artifacts:  # an export made after registration, carried along
            self.model.exports = {runtime: {"folder": Path(context.artifacts[EXPORT])}}
            self.model.runtime = runtime
        else:
            choose_runtime(self.model, runtime)
        self.task = _served(self.model)
        self.loaded = _load(self.model)  # once, not per request
        log.info("serving %s with %s", self.model.describe(), self.model.runtime)

    def predict(self, context: Any, model_input: Any, params: Any = None) -> pd.DataFrame:
        table = pd.DataFrame(model_input).reset_index(drop=True)
        column = self.model.text_column if self.model.text_column in table else "text"
        return self.task.predict(self.model, table, column, lambda: self.loaded)


def build(
    version_dir: str | Path,
    out: str | Path,
    runtime: str = "auto",
    export_folder: str | Path | None = None,
) -> Path:
    """Write the MLflow model of a registered version to ``out`` (replaced atomically);
    ``export_folder``: the verified export of ``runtime`` when it is not one registered with
    the version (``domaintune export`` made it later)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    mlflow.pyfunc.save_model(
        str(tmp),
        python_model=DomaintuneModel(),
        artifacts={
            ARTIFACT: str(version_dir),
            **({EXPORT: str(export_folder)} if export_folder else {}),
        },
        model_config={"runtime": runtime},
        pip_requirements=["domaintune"],
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def serve_command(model_dir: str | Path, host: str, port: int, workers: int = 1) -> list[str]:
    """``mlflow models serve`` on the local environment (the one domaintune runs in)."""
    import sys

    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow) if mlflow.exists() else "mlflow",
        "models",
        "serve",
        "-m",
        str(model_dir),
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
    ]
