"""Hyperparameter search with Optuna: what the ``tune`` flow (``flows/tune.py``) runs.

- The search space (``tune.space``) names training keys, as ``--set`` does. Every trial is
  the config with the sampled values applied and validated again, trained by the finetune
  stage: a trial *is* the finetune entry those settings name, so ``domaintune run`` with the
  best settings is Cached, and a trial that lands on settings trained before costs nothing.
- The objective is the trial's best validation metric (the metric that picks the best
  checkpoint: ``evaluation.primary_metric``, or the validation loss for task types whose
  checkpoints are picked by it); the test split is never read by a trial.
- Pruning: each evaluation's validation metric is reported to Optuna through the finetune
  stage's ``observer`` hook; a hopeless trial's training is stopped (its process group
  killed) and its checkpoints discarded, so its entry is never completed.
- The study lives in the store, as an Optuna journal of one object per append under
  ``tune/<name>/<study key>/journal/`` (a local folder or an object store alike), held under
  the store's lock for the study while trials run. Running the same search again continues
  it: finished trials count, a trial left running by a killed process is marked failed and
  its settings are tried again (its training resumes from its checkpoints).

Optuna is imported inside functions only: loading a config never imports it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from domaintune.config import RetrainConfig
from domaintune.config.space import candidates, leaf_annotation, numeric
from domaintune.errors import ConfigError, ModelError, StoreError, TrainingFailed
from domaintune.fingerprint import hash_obj

if TYPE_CHECKING:
    from domaintune.config import TuneConfig, TuneParamConfig
    from domaintune.storage.manifests import SplitManifest
    from domaintune.storage.store import Store

log = logging.getLogger(__name__)

STAGE = "tune"
VERSION = "1"

_SCALARS = (str, int, float, bool, type(None))


# ----------------------------------------------------------------------------- the space


def _label(choice: Any) -> Any:
    """A choice as Optuna stores it: scalars as they are, others as JSON text."""
    return choice if isinstance(choice, _SCALARS) else json.dumps(choice, sort_keys=True)


def suggest(trial: Any, space: dict[str, TuneParamConfig]) -> dict[str, Any]:
    """The trial's value of every key of the space (sampled, or fixed by an enqueued trial)."""
    values: dict[str, Any] = {}
    for path, spec in space.items():
        if spec.choices is not None:
            labels = [_label(c) for c in spec.choices]
            got = trial.suggest_categorical(path, labels)
            values[path] = spec.choices[labels.index(got)]
        elif numeric(leaf_annotation(path, RetrainConfig)) is int:
            step = int(spec.step or 1)
            values[path] = trial.suggest_int(
                path, int(spec.low), int(spec.high), step=step, log=spec.log
            )
        else:
            values[path] = trial.suggest_float(
                path, float(spec.low), float(spec.high), step=spec.step, log=spec.log
            )
    return values


def decode(params: dict[str, Any], space: dict[str, TuneParamConfig]) -> dict[str, Any]:
    """Optuna's stored params (choices as labels) as config values."""
    out = {}
    for path, value in params.items():
        spec = space.get(path)
        if spec is not None and spec.choices is not None:
            labels = [_label(c) for c in spec.choices]
            value = spec.choices[labels.index(value)] if value in labels else value
        out[path] = value
    return out


def with_values(config: RetrainConfig, values: dict[str, Any]) -> RetrainConfig:
    """A copy of ``config`` with dotted keys set, validated again (ConfigError: one line)."""
    from domaintune.runconfig import validate_config

    data = config.model_dump(mode="json")
    for path, value in values.items():
        *sections, leaf = path.split(".")
        node = data
        for part in sections:
            if not isinstance(node.get(part), dict):  # a section that is null (lora: null)
                node[part] = {}
            node = node[part]
        node[leaf] = value
    try:
        return validate_config(data, config.name)
    except ConfigError as exc:
        problems = str(exc).splitlines()[1:] or [str(exc)]
        raise ConfigError(problems[0].strip()) from None


def check_space(config: RetrainConfig) -> None:
    """Every value the search may try is one this config takes (rules across keys too, such
    as a strategy kind that needs its settings); ConfigError naming ``tune.space.<key>``
    otherwise. Called before any stage runs. A multi-stage recipe's search is of its last
    stage's settings (the earlier stages train once)."""
    if config.stages:
        from domaintune.recipes import stage_configs

        config = stage_configs(config)[-1].config
    space = config.tune.space
    if not space:
        raise ConfigError(f"{config.name}: tune.space is empty: nothing to search")
    for path, spec in space.items():
        for value in candidates(spec, numeric(leaf_annotation(path, RetrainConfig))):
            try:
                with_values(config, {path: value})
            except ConfigError as exc:
                raise ConfigError(
                    f"{config.name}: tune.space.{path}: {value!r} is refused by this config: {exc}"
                ) from None
    try:
        _probe(config)
    except ConfigError as exc:
        raise ConfigError(
            f"{config.name}: tune.space: the first choice (lowest value) of every key "
            f"together is refused by this config: {exc}"
        ) from None


def _probe(config: RetrainConfig) -> RetrainConfig:
    """The config at the space's first point (first choices, lowest values): its finetune
    key stands for everything fixed in the search (data, base model, the other settings)."""
    space = config.tune.space
    return with_values(
        config,
        {p: candidates(s, numeric(leaf_annotation(p, RetrainConfig)))[0] for p, s in space.items()},
    )


def objective_of(config: RetrainConfig) -> tuple[str, bool]:
    """(the validation metric each trial is judged by, whether greater is better): what
    picks the best checkpoint, so the objective is the finetune entry's ``best_metric``."""
    from domaintune.tasktypes import get_task_type

    return get_task_type(config.task.type).metric_for_best_model(
        config.evaluation.primary_metric or ""
    )


def study_key(config: RetrainConfig, splits: SplitManifest) -> str:
    """What defines the search: the data and everything fixed in the training (the finetune
    key of the space's first point: data split, base model, other settings, libraries), the
    space, the objective, the sampler and its seed, the pruner. Not the number of trials."""
    from domaintune.tasks.finetune import plan

    t = config.tune
    fixed, _, _ = plan(_probe(config), splits)
    return hash_obj(
        STAGE,
        VERSION,
        fixed,
        {p: s.model_dump(mode="json") for p, s in sorted(t.space.items())},
        objective_of(config),
        t.sampler,
        _seed(config),
        t.startup_trials,
        t.pruner,
        t.prune_startup_trials,
        t.prune_from_evaluation,
        length=16,
    )


def _seed(config: RetrainConfig) -> int:
    return config.tune.seed if config.tune.seed is not None else config.training.seed


# ------------------------------------------------------------------ the journal in the store


def study_journal(fs: Any, folder: str) -> Any:
    """An Optuna journal backend (``JournalStorage(study_journal(...))``) kept as numbered
    objects in ``folder`` of the file system ``fs`` (the store's: local or an object store)."""
    return _journal_class()(fs, folder)


# the class is built on first use: it subclasses a optuna class, and importing optuna
# where this module loads would slow `domaintune --help` and config loading (start-up)
@functools.cache
def _journal_class() -> type:
    from optuna.storages.journal import BaseJournalBackend

    class StoreJournal(BaseJournalBackend):
        """Optuna's journal as numbered objects ``<folder>/<N>.json`` in the store's file
        system, one per append (a JSON list of operations), written create-if-absent."""

        def __init__(self, fs: Any, folder: str) -> None:
            self.fs = fs
            self.folder = folder.rstrip("/")
            self._logs: list[dict[str, Any]] = []
            self._last = -1  # the highest object number read

        def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
            from domaintune.storage.coordination import numbered_objects

            for n in numbered_objects(self.fs, self.folder):
                if n > self._last:
                    self._logs.extend(json.loads(self.fs.cat_file(self._path(n))))
                    self._last = n
            return self._logs[log_number_from:]

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            from domaintune.storage.coordination import numbered_objects

            data = json.dumps(logs, separators=(",", ":")).encode()
            for _ in range(100):
                n = max([self._last, *numbered_objects(self.fs, self.folder)]) + 1
                try:
                    _create(self.fs, self._path(n), data)
                    return
                except FileExistsError:
                    continue  # another writer took that number: the next one
            raise StoreError(f"tune: cannot append to the study journal {self.folder}")

        def _path(self, n: int) -> str:
            return f"{self.folder}/{n:08d}.json"

    return StoreJournal


def _create(fs: Any, path: str, data: bytes) -> None:
    """Create ``path`` whole, only if absent: a local file is written aside and linked into
    place (a killed writer never leaves half an object), an object store creates it at once."""
    from fsspec.implementations.local import LocalFileSystem

    from domaintune.storage.coordination import create_exclusive

    if not isinstance(fs, LocalFileSystem):
        create_exclusive(fs, path, data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".append-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # FileExistsError if another writer got there first
    finally:
        os.unlink(tmp)


# ---------------------------------------------------------------------------- the trials


@dataclass
class TrialRun:
    """One trial being trained: its Optuna trial, its settings and its config."""

    number: int
    trial: Any
    values: dict[str, Any]
    config: RetrainConfig
    retry_of: int | None = None
    started: float = field(default_factory=time.time)
    reported: dict[int, float] = field(default_factory=dict)


@dataclass
class TrialOutcome:
    state: str  # "complete" or "pruned"
    value: float | None
    key: str
    cached: bool = False
    pruned_at: int | None = None
    message: str = ""


class Tuner:
    """A study of one search, open under the store's lock for it (see ``Tuner.open``)."""

    def __init__(
        self, config: RetrainConfig, splits: SplitManifest, store: Store, study: Any, key: str
    ):
        self.config = config
        self.splits = splits
        self.store = store
        self.study = study
        self.key = key
        self.metric, self.greater = objective_of(config)
        self.recovered: list[str] = []

    # ------------------------------------------------------------------ opening
    @classmethod
    @contextlib.contextmanager
    def open(cls, config: RetrainConfig, splits: SplitManifest, store: Store) -> Iterator[Tuner]:
        """The study of this search, created or continued, held for the body of the ``with``
        (a second ``tune`` of the same search waits, then finds the trials done)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        key = study_key(config, splits)
        with store.lock(STAGE, key):
            folder = store.remote_path(*study_folder(config, key), "journal")
            journal = study_journal(store.fs, folder)
            storage = optuna.storages.JournalStorage(journal)
            study = optuna.create_study(
                storage=storage,
                study_name=config.name,
                direction="maximize" if objective_of(config)[1] else "minimize",
                pruner=_pruner(config.tune),
                load_if_exists=True,
            )
            # a fresh seed per (re)start: a resumed study does not repeat its first draws
            study.sampler = _sampler(config.tune, _seed(config) + len(study.trials))
            tuner = cls(config, splits, store, study, key)
            tuner._recover()
            yield tuner

    def _recover(self) -> None:
        """Trials a killed (or failed) run left behind: marked failed, tried again."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        for t in trials:
            unfinished = t.state == TrialState.RUNNING
            failed = t.state == TrialState.FAIL and not t.user_attrs.get("refused")
            if not (unfinished or failed) or t.number in retried:
                continue
            if unfinished:
                self.study.tell(t.number, state=TrialState.FAIL)
            self.study.enqueue_trial(
                t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False
            )
            self.recovered.append(
                f"trial {t.number} {'was left running' if unfinished else 'failed'}: "
                "its settings are tried again"
            )
        for line in self.recovered:
            log.info("tune: %s", line)

    # ------------------------------------------------------------------ the loop
    def finished(self) -> int:
        """Trials that count toward ``tune.trials``: completed, pruned, refused settings."""
        from optuna.trial import TrialState

        return sum(
            t.state in (TrialState.COMPLETE, TrialState.PRUNED) or bool(t.user_attrs.get("refused"))
            for t in self.study.get_trials(deepcopy=False)
        )

    def ask(self, trials: int) -> TrialRun | None:
        """The next trial to train, or None once ``trials`` have finished."""
        if self.finished() >= trials:
            return None
        trial = self.study.ask()
        values = suggest(trial, self.config.tune.space)
        retry_of = trial.user_attrs.get("retry_of")
        try:
            config = with_values(self.config, values)
        except ConfigError as exc:  # a combination of values the config refuses
            run = TrialRun(trial.number, trial, values, self.config, retry_of)
            self.tell(run, ConfigError(f"tune: trial {trial.number}: {exc}"))
            return self.ask(trials)
        return TrialRun(trial.number, trial, values, config, retry_of)

    def train(self, run: TrialRun) -> TrialOutcome:
        """The trial's training (the finetune stage, with pruning): what its task runs."""
        import optuna

        from domaintune.tasks.finetune import finetune, plan

        key, _, _ = plan(run.config, self.splits)
        try:
            model = finetune(run.config, self.splits, self.store, observer=self._observer(run))
        except optuna.TrialPruned as exc:
            self._discard(run.config, key)
            step = max(run.reported) if run.reported else None
            return TrialOutcome("pruned", None, key, pruned_at=step, message=str(exc))
        if model.best_metric is None or not math.isfinite(model.best_metric):
            raise TrainingFailed(
                f"tune: trial {run.number}: the training reported no validation "
                f"{self.metric} (best_metric {model.best_metric})"
            )
        return TrialOutcome("complete", float(model.best_metric), key, cached=model.reused)

    def _observer(self, run: TrialRun) -> Any:
        """Reports each evaluation's validation metric to the trial; raises TrialPruned when
        Optuna's pruner gives up on it (the finetune stage then stops the training)."""
        import optuna

        every = run.config.training.checkpoint_every_steps
        name = f"eval_{self.metric}"

        def observe(event: dict[str, Any]) -> None:
            value = event.get(name)
            if not isinstance(value, int | float):
                return
            # the n-th evaluation: the epoch, or the n-th of every `checkpoint_every_steps`
            if every:
                step = max(1, round(int(event.get("step") or 0) / every))
            else:
                step = max(1, math.ceil(float(event.get("epoch") or 0) - 1e-6))
            if step not in run.reported:  # a retried task evaluates again where it resumes
                run.trial.report(float(value), step)
                run.reported[step] = float(value)
            if run.trial.should_prune():
                raise optuna.TrialPruned(
                    f"trial {run.number} pruned at evaluation {step}: validation {self.metric} "
                    f"{value:.4g} is worse than the median of completed trials there"
                )

        return observe

    def _discard(self, config: RetrainConfig, key: str) -> None:
        """A pruned trial's checkpoints (locally and, for a remote store, in the store)."""
        from domaintune.tasks.finetune import STAGE as FINETUNE
        from domaintune.training.checkpoints import CheckpointMirror

        with self.store.lock(FINETUNE, key):
            if self.store.is_complete(FINETUNE, key):
                return
            work = self.store.local_path(FINETUNE, ".work", key)
            CheckpointMirror(self.store, key, work).clear()
            shutil.rmtree(work, ignore_errors=True)

    def tell(self, run: TrialRun, result: TrialOutcome | BaseException) -> None:
        """Record how the trial ended. Settings the config or the model refuse (ConfigError,
        ModelError: a combination of values, a strategy the model cannot take) fail the trial
        and the search goes on; any other error fails the trial (tried again when the search
        resumes) and is raised."""
        from optuna.trial import TrialState

        study, n, trial = self.study, run.number, run.trial
        trial.set_user_attr("seconds", round(time.time() - run.started, 2))
        if isinstance(result, BaseException):
            refused = isinstance(result, ConfigError | ModelError)
            trial.set_user_attr("error", (str(result).splitlines() or [""])[0][:300])
            trial.set_user_attr("refused", refused)
            study.tell(n, state=TrialState.FAIL)
            what = "refused (the search goes on)" if refused else "failed"
            log.warning("tune: trial %d %s: %s", n, what, (str(result).splitlines() or [""])[0])
            if not refused:
                raise result
            return
        trial.set_user_attr("finetune_key", result.key)
        trial.set_user_attr("cached", result.cached)
        if result.state == "pruned":
            trial.set_user_attr("pruned_at", result.pruned_at)
            study.tell(n, state=TrialState.PRUNED)
            log.info("tune: %s", result.message)
        else:
            study.tell(n, result.value)
            log.info(
                "tune: trial %d: validation %s %.4f%s (%s)",
                n,
                self.metric,
                result.value,
                " (cached)" if result.cached else "",
                _settings_text(run.values),
            )

    # ------------------------------------------------------------------ results
    def best(self) -> Any:
        """The best completed trial (FrozenTrial); TrainingFailed when none completed."""
        from optuna.trial import TrialState

        if not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            states = _counts(self.rows())
            raise TrainingFailed(
                f"tune: no trial completed ({states or 'no trials'}); nothing to evaluate"
            )
        return self.study.best_trial

    def best_config(self) -> RetrainConfig:
        return with_values(self.config, decode(self.best().params, self.config.tune.space))

    def rows(self) -> list[dict[str, Any]]:
        """Every trial: number, state, value, its settings (one column per key), seconds,
        cached, the trial it retries, and why it failed or where it was pruned."""
        space = self.config.tune.space
        trials = self.study.get_trials(deepcopy=False)
        retried_as = {
            t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs
        }
        rows = []
        for t in trials:
            a = t.user_attrs
            seconds = a.get("seconds")
            if seconds is None and t.duration is not None:
                seconds = round(t.duration.total_seconds(), 2)
            note = a.get("error") or ("killed while it trained" if t.state.name == "FAIL" else None)
            if a.get("pruned_at"):
                note = f"pruned at evaluation {a['pruned_at']}"
            if t.number in retried_as:
                note = f"{note}; tried again as trial {retried_as[t.number]}"
            rows.append(
                {
                    "number": t.number,
                    "state": _state_text(t),
                    "value": t.value if t.state.name == "COMPLETE" else None,
                    **{_short(p): v for p, v in decode(t.params, space).items()},
                    "seconds": seconds,
                    "cached": a.get("cached"),
                    "retry_of": a.get("retry_of"),
                    "note": note,
                }
            )
        return rows

    def importances(self) -> tuple[dict[str, float], str]:
        """Optuna's parameter importances (PED-ANOVA) and a note; {} with the reason when
        there are not enough completed trials with different settings."""
        import optuna
        from optuna.trial import TrialState

        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        distinct = {json.dumps(t.params, sort_keys=True, default=str) for t in done}
        if len(done) < 2 or len(distinct) < 2:
            return {}, (
                "Parameter importances need at least 2 completed trials with different "
                f"settings ({len(done)} completed, {len(distinct)} distinct)."
            )
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                found = optuna.importance.get_param_importances(self.study)
            except (RuntimeError, ValueError) as exc:
                return {}, f"Optuna could not compute parameter importances: {exc}"
        note = " ".join(["Optuna's PED-ANOVA importances.", *{str(w.message) for w in said}])
        return {k: float(v) for k, v in found.items()}, note

    def report_markdown(self) -> str:
        """The search for the Prefect UI: trials, best settings, importances with a chart, and
        the validation metric per trial."""
        from domaintune.reporting.charts import bar_chart_svg, data_uri

        rows = self.rows()
        better = "higher" if self.greater else "lower"
        lines = [
            f"# Hyperparameter search: {self.config.name}",
            "",
            f"{len(rows)} trial(s): {_counts(rows)}. Objective: the best validation "
            f"**{self.metric}** of each training ({better} is better); study `{self.key}`.",
            "",
        ]
        if any(r["state"] == "complete" for r in rows):
            best = self.best()
            lines += [
                f"## Best: trial {best.number}, validation {self.metric} {best.value:.4f}",
                "",
                "| key | value |",
                "|---|---|",
                *(
                    f"| {p} | {_fmt(v)} |"
                    for p, v in decode(best.params, self.config.tune.space).items()
                ),
                "",
            ]
        importances, note = self.importances()
        lines += ["## Parameter importance", "", note, ""]
        if importances:
            lines += ["| parameter | importance |", "|---|---:|"]
            lines += [f"| {p} | {v:.3f} |" for p, v in importances.items()]
            chart = bar_chart_svg(
                {_short(p): round(v, 3) for p, v in importances.items()},
                "importance of each parameter",
            )
            lines += ["", f"![parameter importance]({data_uri(chart)})", ""]
        values = {
            f"trial {r['number']}": round(r["value"], 4) for r in rows if r["value"] is not None
        }
        if values:
            chart = bar_chart_svg(
                values, f"validation {self.metric} per trial ({better} is better)"
            )
            lines += [
                f"## Validation {self.metric} per trial",
                "",
                f"![per trial]({data_uri(chart)})",
            ]
        return "\n".join(lines) + "\n"

    def save_summary(self, summary: dict[str, Any]) -> str:
        """``study.json`` beside the journal: the search's outcome, for people and tools."""
        path = self.store.remote_path(*study_folder(self.config, self.key), "study.json")
        tmp = f"{path}.{uuid.uuid4().hex[:8]}"
        self.store.fs.pipe_file(tmp, json.dumps(summary, indent=2, default=str).encode())
        self.store.fs.mv(tmp, path)
        return self.store.url_of(*study_folder(self.config, self.key), "study.json")


def study_folder(config: RetrainConfig, key: str) -> tuple[str, ...]:
    return (STAGE, config.name, key)


def _sampler(t: TuneConfig, seed: int) -> Any:
    import optuna

    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=t.startup_trials, seed=seed)


def _pruner(t: TuneConfig) -> Any:
    import optuna

    if t.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=t.prune_startup_trials, n_warmup_steps=t.prune_from_evaluation
    )


def _state_text(t: Any) -> str:
    """complete, pruned, running, waiting; failed (tried again) or refused (settings the
    config or the model refuse)."""
    if t.state.name == "FAIL":
        return "refused" if t.user_attrs.get("refused") else "failed"
    return t.state.name.lower()


def state_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many trials ended in each state (``Tuner.rows``)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts


def _counts(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{v} {k}" for k, v in state_counts(rows).items())


def _short(path: str) -> str:
    return path.removeprefix("training.")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if not isinstance(v, str) else v


def _settings_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{_short(p)}={_fmt(v)}" for p, v in values.items())


def set_options(values: dict[str, Any]) -> list[str]:
    """The settings as ``--set`` options: ``domaintune run`` with them trains nothing new."""
    return [f"{p}={json.dumps(v) if not isinstance(v, str) else v}" for p, v in values.items()]


def render_trials(s: dict[str, Any]) -> str:
    """The search in the ``domaintune tune`` text output (after what ``run`` shows of the
    best model): every trial, then the best settings as ``--set`` options."""
    trials, metric = s["trials"], s["study"]["metric"]
    keys = [k for k in (trials[0] if trials else {}) if k not in _ROW_FIXED]
    head = ["trial", "state", metric, *keys, "seconds", "cached"]
    table = [
        [
            str(r["number"]),
            r["state"],
            "-" if r["value"] is None else f"{r['value']:.4f}",
            *(_fmt(r.get(k)) if r.get(k) is not None else "-" for k in keys),
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "yes" if r["cached"] else "no",
        ]
        for r in trials
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *table, strict=True)]
    best = s["best"]
    return "\n".join(
        [
            f"  search:   {len(trials)} trial(s): {_counts(trials)}; study {s['study']['path']}",
            "",
            "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(),
            *(
                "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                for row in table
            ),
            *(f"  trial {r['number']}: {r['note']}" for r in trials if r.get("note")),
            "",
            f"  best:     trial {best['trial']}, validation {metric} {best['value']:.4f}; "
            "the same training with domaintune run:",
            *(f"    --set {o}" for o in best["set"]),
        ]
    )


_ROW_FIXED = ("number", "state", "value", "seconds", "cached", "retry_of", "note")
