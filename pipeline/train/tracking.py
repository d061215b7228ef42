"""MLflow tracking of Ray Train runs: one MLflow run per training job, resumed by name.

Who logs what:

- The **driver** (:func:`start_run`, before ``fit``) finds or creates the MLflow run:
  its name is the Ray Train run name and it carries the tags ``ray_train_run_name``
  and ``ray_storage_path``; a re-submitted job with the same run name finds the run
  by that tag and logs into it again (status back to RUNNING). It logs every
  parameter (a parameter whose value changed on resubmission is kept and the new
  value recorded as the tag ``param_override.<name>``, since MLflow parameters are
  immutable).
- The **Ray Train controller** logs the metrics through :class:`MlflowCallback`, a
  Ray Train ``UserCallback`` that runs after every ``ray.train.report``: the per-step
  training metrics (from the reported ``history``, averaged over workers, one MLflow
  step per training step) and the validation / RD-point metrics. Why the controller
  and not rank 0: the controller runs on the driver's node, so a local SQLite store
  works in a multi-node cluster too, and workers never touch MLflow; why not the
  driver after ``fit``: V2 results keep only the last report, and metrics should show
  up while the job runs. Worker failures are counted (``worker_failures``).
- The **controller** also records where the workers run (:class:`WorkerPlacementCallback`,
  a Ray Train worker-group callback): the tag ``worker_nodes`` (JSON: node id ->
  node IP and world ranks, rewritten when a failure restarts the group) and
  ``worker_node_count``, so a multi-node run shows its placement in MLflow.
- The **driver** before ``fit`` logs a warm start (:func:`log_warm_start`): the source of
  the initial weights and which layers started fresh.
- The **driver** after ``fit`` (:func:`finish_run`): the RD points as a JSON artifact
  (``rd_points.json``), the final checkpoint's ``model.pt`` as the artifact
  ``checkpoint/model.pt``, a new version of the registered model (plain artifact
  source, no MLflow model flavour), the ``champion`` alias moved to the best version
  by ``champion_metric`` (lower is better), and the run marked FINISHED.

Steps re-run after a failure are logged again with the same step numbers (MLflow
keeps both values); the ``start_step`` metric shows where each attempt started.

Default store (:func:`pipeline.mlflow_store.resolve_tracking_uri`): ``sqlite:///<storage_path>/mlflow.db``
with artifacts in ``<storage_path>/mlartifacts``; ``--mlflow-uri`` or ``MLFLOW_TRACKING_URI`` override it.
A storage path on a shared filesystem (NFS) gives every node the same store; with an
object-store storage URI (``s3://``, ``gs://``) there is no default (a SQLite file cannot
live there): give a tracking server.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_TAG = "ray_train_run_name"
STORAGE_TAG = "ray_storage_path"
WORKERS_TAG = "worker_nodes"
CHAMPION = "champion"
_MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch


def _artifact_location(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None  # a server decides


def client(tracking_uri: str):
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(c, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
    except Exception:  # noqa: BLE001 - created concurrently by another job
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def find_run(tracking_uri: str, experiment: str, run_name: str) -> str | None:
    """The MLflow run id linked to a Ray Train run name, or None."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.{RUN_TAG} = '{run_name}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Find (by the Ray run name) or create the MLflow run; log params. Returns (run_id, resumed)."""
    from mlflow.entities import Param, RunTag

    c = client(tracking_uri)
    exp_id = _experiment_id(c, experiment, tracking_uri)
    run_id = find_run(tracking_uri, experiment, run_name)
    resumed = run_id is not None
    all_tags = {RUN_TAG: run_name, **(tags or {})}
    if run_id is None:
        run_id = c.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        existing: dict[str, str] = {}
    else:
        c.update_run(run_id, status="RUNNING")
        existing = c.get_run(run_id).data.params
    flat = _flatten(params)
    new = [Param(k, v[:6000]) for k, v in flat.items() if k not in existing]
    changed = {f"param_override.{k}": v[:5000] for k, v in flat.items() if k in existing and existing[k] != v[:6000]}
    run_tags = [RunTag(k, v) for k, v in {**all_tags, **changed,
                                          "resubmissions": str(_resubmissions(c, run_id) + resumed)}.items()]
    for i in range(0, max(len(new), 1), 90):  # log_batch: at most 100 params per call
        c.log_batch(run_id, params=new[i:i + 90], tags=run_tags if i == 0 else [])
    return run_id, resumed


def _resubmissions(c, run_id: str) -> int:
    try:
        return int(c.get_run(run_id).data.tags.get("resubmissions", "0"))
    except ValueError:
        return 0


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_metrics(tracking_uri: str, run_id: str, rows: list[tuple[str, float, int]]) -> None:
    """Log (key, value, step) rows in batches (non-finite values are skipped)."""
    from mlflow.entities import Metric

    c = client(tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(s)) for k, v, s in rows if _finite(v)]
    for i in range(0, len(metrics), _MAX_BATCH):
        c.log_batch(run_id, metrics=metrics[i:i + _MAX_BATCH])


def report_rows(metrics: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """The MLflow rows of one ``ray.train.report``: per-step ``history`` averaged over the
    workers (``train/<name>``), plus rank 0's other numeric metrics at its ``step``."""
    rows: list[tuple[str, float, int]] = []
    by_step: dict[int, list[dict[str, float]]] = {}
    for worker in metrics:
        for h in worker.get("history") or []:
            by_step.setdefault(int(h["step"]), []).append(h)
    for step, hs in sorted(by_step.items()):
        for k in {k for h in hs for k in h if k != "step"}:
            vals = [h[k] for h in hs if k in h]
            rows.append((f"train/{k}", sum(vals) / len(vals), step))
    head = metrics[0] if metrics else {}
    step = int(head.get("step", 0))
    for k, v in head.items():
        if k in ("history", "step_times", "rd_points") or k in {r[0].removeprefix("train/") for r in rows}:
            continue
        if _finite(v):
            rows.append((k, float(v), step))
    return rows


try:  # the callback base class exists only with Ray Train V2
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - Ray Train V1 only
    _UserCallback = object


class MlflowCallback(_UserCallback):
    """Ray Train V2 ``UserCallback`` (runs on the controller): report -> MLflow metrics.

    Never raises: a tracking hiccup is logged as a warning and training goes on.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.failures = 0

    def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ANN001 - Ray's signature
        try:
            rows = report_rows(metrics)
            if checkpoint is not None and metrics:
                rows.append(("checkpoint_step", float(metrics[0].get("step", 0)), int(metrics[0].get("step", 0))))
            log_metrics(self.tracking_uri, self.run_id, rows)
            if checkpoint is not None:
                client(self.tracking_uri).set_tag(self.run_id, "latest_checkpoint", checkpoint.path)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow logging failed: %s", exc)

    def after_exception(self, run_context, worker_exceptions) -> None:  # noqa: ANN001
        try:
            self.failures += 1
            c = client(self.tracking_uri)
            c.log_metric(self.run_id, "worker_failures", self.failures)
            first = next(iter(worker_exceptions.values()), None)
            if first is not None:
                c.set_tag(self.run_id, "last_worker_error", str(first).strip().splitlines()[0][:500]
                          if str(first).strip() else type(first).__name__)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow logging failed: %s", exc)


try:  # a DeveloperAPI of Ray Train V2 (runs on the controller, like UserCallback)
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback as _WorkerGroupCallback
except ImportError:  # pragma: no cover - another Ray Train version: no placement tag
    _WorkerGroupCallback = None


def worker_placement(workers) -> dict[str, dict[str, Any]]:
    """``{node_id: {"ip": node IP, "ranks": [world ranks]}}`` of a worker group's workers."""
    nodes: dict[str, dict[str, Any]] = {}
    for i, w in enumerate(workers):
        ctx = getattr(w, "distributed_context", None)
        rank = ctx.world_rank if ctx is not None else i
        node = nodes.setdefault(w.metadata.node_id, {"ip": w.metadata.node_ip, "ranks": []})
        node["ranks"].append(rank)
    for node in nodes.values():
        node["ranks"].sort()
    return nodes


class WorkerPlacementCallback(_WorkerGroupCallback or object):
    """Ray Train worker-group callback (controller): the MLflow tags ``worker_nodes`` and
    ``worker_node_count`` each time the worker group starts. Never raises."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def after_worker_group_start(self, worker_group) -> None:
        try:
            nodes = worker_placement(worker_group.get_workers())
            c = client(self.tracking_uri)
            c.set_tag(self.run_id, WORKERS_TAG, json.dumps(nodes, sort_keys=True)[:5000])
            c.set_tag(self.run_id, "worker_node_count", str(len(nodes)))
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow logging of the worker placement failed: %s", exc)


def placement_callbacks(tracking_uri: str, run_id: str) -> list[Any]:
    """``[WorkerPlacementCallback]`` where this Ray Train has worker-group callbacks, else ``[]``."""
    return [WorkerPlacementCallback(tracking_uri, run_id)] if _WorkerGroupCallback is not None else []


def log_warm_start(tracking_uri: str, run_id: str, report: dict[str, Any]) -> None:
    """What a warm-started run began from: tags ``init_source``, ``init_fresh_layers``,
    ``init_rate_point`` and the whole report as the artifact ``warm_start.json``."""
    c = client(tracking_uri)
    c.set_tag(run_id, "init_source", str(report["source"])[:5000])
    c.set_tag(run_id, "init_fresh_layers", (", ".join(report["fresh"]) or "none")[:5000])
    if report.get("rate_point") is not None:
        c.set_tag(run_id, "init_rate_point", str(report["rate_point"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "warm_start.json"
        path.write_text(json.dumps(report, indent=1))
        c.log_artifact(run_id, str(path))


def log_benchmark(tracking_uri: str, run_name: str, params: dict[str, Any], rows: list[tuple[str, float, int]],
                  result: dict[str, Any], artifact: str) -> str:
    """One finished MLflow run of a benchmark (experiment ``roicodec-benchmarks``): its
    parameters, metric ``rows`` and the whole ``result`` as the JSON artifact ``artifact``."""
    run_id, _ = start_run(tracking_uri, "roicodec-benchmarks", run_name, params)
    log_metrics(tracking_uri, run_id, rows)
    c = client(tracking_uri)
    c.log_dict(run_id, result, artifact)
    c.set_terminated(run_id)
    return run_id


def finish_run(tracking_uri: str, run_id: str, *, checkpoint_dir: str | Path | None,
               final_metrics: dict[str, Any], registered_model: str | None,
               champion_metric: str = "val_loss", register: bool = True) -> dict[str, Any]:
    """After ``fit``: RD points artifact, checkpoint artifact, model version, champion alias.

    Returns ``{"model_version", "champion_version", "artifact_uri"}`` (None where skipped).
    """
    c = client(tracking_uri)
    out: dict[str, Any] = {"model_version": None, "champion_version": None, "artifact_uri": None}
    rd = final_metrics.get("rd_points")
    if rd:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rd_points.json"
            path.write_text(json.dumps({"step": final_metrics.get("step"), "points": rd}, indent=1))
            c.log_artifact(run_id, str(path))
    model_file = Path(checkpoint_dir) / "model.pt" if checkpoint_dir else None
    if model_file is not None and model_file.is_file():
        c.log_artifact(run_id, str(model_file), "checkpoint")
        artifact_uri = f"{c.get_run(run_id).info.artifact_uri}/checkpoint"
        out["artifact_uri"] = artifact_uri
        if register and registered_model:
            out["model_version"] = register_version(c, registered_model, artifact_uri, run_id, final_metrics,
                                                    champion_metric)
            out["champion_version"] = update_champion(c, registered_model, champion_metric)
    c.set_terminated(run_id, "FINISHED")
    return out


def register_version(c, name: str, source: str, run_id: str, metrics: dict[str, Any],
                     champion_metric: str) -> str:
    """A new version of ``name`` pointing at the checkpoint artifact, tagged with its metrics."""
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name, description="roicodec ROI learned image codec checkpoints "
                                                    "(artifact: checkpoint/model.pt)")
    except MlflowException:
        pass  # exists already
    tags = {"step": str(metrics.get("step", "")),
            **{k: repr(float(v)) for k, v in metrics.items() if k.startswith("val_") and _finite(v)}}
    if champion_metric in metrics and _finite(metrics[champion_metric]):
        tags[champion_metric] = repr(float(metrics[champion_metric]))
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return str(mv.version)


def update_champion(c, name: str, metric: str = "val_loss") -> str | None:
    """Point the ``champion`` alias at the version with the lowest ``metric`` tag."""
    best: tuple[float, int] | None = None
    for mv in c.search_model_versions(f"name = '{name}'"):
        try:
            value = float(mv.tags[metric])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value) and (best is None or (value, -int(mv.version)) < (best[0], -best[1])):
            best = (value, int(mv.version))
    if best is None:
        return None
    c.set_registered_model_alias(name, CHAMPION, str(best[1]))
    return str(best[1])


def fail_run(tracking_uri: str, run_id: str, message: str) -> None:
    """Mark the run FAILED (a re-submission sets it RUNNING again)."""
    try:
        c = client(tracking_uri)
        c.set_tag(run_id, "error", message[:500])
        c.set_terminated(run_id, "FAILED")
    except Exception as exc:  # noqa: BLE001
        log.warning("could not mark the MLflow run failed: %s", exc)
