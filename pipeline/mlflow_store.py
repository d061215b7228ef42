"""The MLflow store: which tracking URI every part of the project uses, and the checkpoint
file a model URI names.

:func:`resolve_tracking_uri` is the one default: an explicit URI, else ``MLFLOW_TRACKING_URI``,
else the SQLite file ``mlflow.db`` in a training job's storage path, or, without one
(evaluation, the service), ``sqlite:///mlflow.db`` in the working folder (MLflow's own
default). :func:`resolve_checkpoint` turns ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/...`` or a path into a local ``model.pt``. Nothing here imports Ray.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

STORE_FILE = "mlflow.db"
ENV = "MLFLOW_TRACKING_URI"


def sqlite_store(folder: str | Path) -> str:
    """``sqlite:///<folder>/mlflow.db`` with the folder made absolute."""
    return f"sqlite:///{Path(folder).expanduser().resolve() / STORE_FILE}"


def resolve_tracking_uri(uri: str | None = None, storage_path: str | Path | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in ``storage_path``, else
    ``sqlite:///mlflow.db``. ValueError for an object-store ``storage_path`` (``s3://``,
    ``gs://``): a SQLite file cannot live there."""
    if uri:
        return uri
    env = os.environ.get(ENV)
    if env:
        return env
    if storage_path is None:
        return f"sqlite:///{STORE_FILE}"
    text = str(storage_path)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"no default MLflow store for the storage URI {text} (a SQLite file cannot live there): "
                         f"give a tracking server with --mlflow-uri or {ENV}")
    return sqlite_store(text.removeprefix("file://"))


def resolve_checkpoint(checkpoint: str | None, model_uri: str | None,
                       tracking_uri: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The local checkpoint file to load and where it came from.

    ``checkpoint`` (a path, or ``default``: the installed pretrained model) wins; neither given:
    the default model. ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the
    registered version's source (``pipeline.train.tracking`` registers the ``checkpoint/``
    artifact folder, no MLflow flavour) downloaded from the store :func:`resolve_tracking_uri`
    picks; any other URI (``runs:/ID/checkpoint``, a path) is downloaded as is. The file
    is ``model.pt`` in it (or the only ``*.pt``).
    """
    if checkpoint or not model_uri:
        from pipeline.codec.default_model import checkpoint_path

        return checkpoint_path(checkpoint or None), {"checkpoint": str(checkpoint or "default")}
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    source, info = model_uri, {"model_uri": model_uri}
    if model_uri.startswith("models:/"):
        rest = model_uri[len("models:/"):].strip("/")
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            mv = c.get_model_version(name, version)
        else:
            raise ValueError(f"model URI {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
        source = mv.source
        info.update(model_name=mv.name, model_version=str(mv.version), run_id=mv.run_id)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri,
                                                     dst_path=tempfile.mkdtemp(prefix="roicodec-serve-")))
    if local.is_file():
        return local, info
    candidates = sorted(local.rglob("model.pt")) or sorted(local.rglob("*.pt"))
    if len(candidates) != 1:
        raise ValueError(f"{model_uri}: expected one checkpoint file (model.pt) in its artifacts, "
                         f"found {len(candidates)}")
    return candidates[0], info
