"""Cluster deployment: ``ray_cluster.yaml``, ``cluster/`` (runtime env, Dockerfile, KubeRay
manifests), the storage setting, and a real multi-node run on this machine.

- ``ray_cluster.yaml`` goes through Ray's own cluster-launcher validation (the JSON schema
  and ``validate_config`` after ``prepare_config``, as ``ray up`` does).
- Every YAML under ``cluster/`` parses; the KubeRay manifests have the fields the
  ``ray.io/v1`` CRDs require; their runtime envs are valid Ray runtime envs; the Serve
  configs validate against Ray Serve's schema and resolve to the project's app builder.
- The job entry points named in the manifests exist, and their own argument parsing accepts
  the arguments given (the scripts run with the heavy call replaced by a recorder).
- ``ROICODEC_STORAGE`` / ``--storage-path`` may be a path or an ``s3://`` / ``gs://`` URI.
- A local two-node Ray cluster runs the preprocessing job and a smoke training whose two
  workers must land on different nodes (slow).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import yaml

from conftest import run_job_script

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
MANIFESTS = ["rayjob-preprocess.yaml", "rayjob-train-ggm.yaml", "rayservice.yaml"]
IMAGE_ROOT = "/home/ray/roicodec"  # where cluster/Dockerfile puts the project
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # KubeRay checks names are DNS-1035 labels


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _manifest(name: str) -> dict:
    return _yaml(KUBERAY / name)


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


def _runtime_env(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}") or {}


# -- ray_cluster.yaml ---------------------------------------------------------------------------

def test_ray_cluster_yaml_passes_ray_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(ROOT / "ray_cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` validates: merged with the provider defaults
    validate_config(prepared)

    # the validator is strict: a misspelt field fails
    broken = copy.deepcopy(prepared)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)

    assert raw["provider"]["type"] in ("aws", "gcp", "azure")  # a real cloud provider
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and gpu, "needs a CPU worker type (preprocessing) and a GPU worker type (training, serving)"
    for t in cpu + gpu:  # autoscaling
        assert t["max_workers"] > t.get("min_workers", 0)
    assert prepared["max_workers"] >= sum(t.get("min_workers", 0) for t in workers.values())

    # the project is copied to the nodes and installed there, in Ray's image of this Ray version
    remote = next(r for r, local in raw["file_mounts"].items() if local in (".", "./"))
    assert any(re.search(rf"pip install .*{re.escape(remote)}(\s|$)", c) for c in raw["setup_commands"])
    assert raw["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    # shared storage: mounted on the hosts and into the containers at the runtime env's path
    storage = _yaml(CLUSTER / "runtime_env.yaml")["env_vars"]["ROICODEC_STORAGE"]
    mount = str(Path(storage).parent)  # /mnt/shared
    assert any(mount in c for c in raw["initialization_commands"])
    assert any(f"{mount}:{mount}" in o for o in raw["docker"]["run_options"])


# -- cluster/ files -----------------------------------------------------------------------------

def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    names = {f.relative_to(CLUSTER).as_posix() for f in files}
    assert {"runtime_env.yaml", "serve_config.yaml", *(f"kuberay/{m}" for m in MANIFESTS)} <= names
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = _yaml(CLUSTER / "runtime_env.yaml")
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "uv", "py_modules", "config"}
    RuntimeEnv(**env)  # Ray's own checks (types of env_vars, working_dir, ...)
    assert env["working_dir"] == "."
    assert {".git", ".venv"} <= set(env["excludes"])
    storage = env["env_vars"]["ROICODEC_STORAGE"]
    assert storage.startswith("/") or "://" in storage


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_has_the_crd_required_fields(name):
    from ray.runtime_env import RuntimeEnv

    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == ("RayService" if name == "rayservice.yaml" else "RayJob")
    assert DNS1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 47  # KubeRay's limit
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for group in [head, *groups]:
        params = group["rayStartParams"]
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), \
            "rayStartParams is map[string]string"
        containers = _containers(group)
        assert containers
        volumes = {v["name"] for v in group["template"]["spec"].get("volumes", [])}
        for c in containers:
            assert c["name"] and c["image"]
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
            assert any(m["mountPath"] == "/mnt/shared" for m in c.get("volumeMounts", [])), "shared storage"
    images = {c["image"] for g in [head, *groups] for c in _containers(g)}
    assert len(images) == 1  # the image of cluster/Dockerfile everywhere
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert DNS1035.match(g["groupName"])
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = [g for g in groups if all("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g))]
    assert gpu, "a GPU worker group"
    assert any(g["maxReplicas"] > g["minReplicas"] for g in groups), "an autoscaling worker group"

    if doc["kind"] == "RayJob":
        assert isinstance(doc["spec"]["entrypoint"], str) and doc["spec"]["entrypoint"].strip()
        assert isinstance(doc["spec"]["runtimeEnvYAML"], str)
        RuntimeEnv(**_runtime_env(doc))
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
    else:
        assert isinstance(doc["spec"]["serveConfigV2"], str)  # a YAML string, not a mapping
        assert any(p.get("containerPort") == 8000 for c in _containers(head) for p in c.get("ports", []))


# -- entry points -------------------------------------------------------------------------------

def _entrypoint(name: str) -> tuple[Path, list[str], dict]:
    doc = _manifest(name)
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(IMAGE_ROOT + "/jobs/"), argv[:2]
    script = ROOT / Path(argv[1]).relative_to(IMAGE_ROOT)
    assert script.is_file(), f"{argv[1]} names no job script of this repository"
    return script, argv[2:], _runtime_env(doc)


def test_preprocess_entrypoint_is_accepted_by_the_job(monkeypatch):
    import pipeline.data.preprocess as pre

    script, args, env = _entrypoint("rayjob-preprocess.yaml")
    seen = {}

    def record(input, output, **kwargs):  # the job's keywords
        seen.update(input=input, output=output, **kwargs)
        return {"rows_written": 0}

    monkeypatch.setattr(pre, "preprocess", record)
    assert run_job_script(script, args) == 0
    storage = env["env_vars"]["ROICODEC_STORAGE"]
    assert seen["output"] == f"{storage}/shards"  # shards under the one storage setting
    assert seen["input"].startswith(storage + "/")
    assert seen["use_gpu"] is True and seen["num_text_actors"] >= 1
    # the job checks up front that each text actor has its GPU: the GPU group starts with enough pods
    gpu = [g for g in _cluster_spec(_manifest("rayjob-preprocess.yaml"))["workerGroupSpecs"]
           if "nvidia.com/gpu" in _containers(g)[0]["resources"]["limits"]]
    assert sum(g["minReplicas"] for g in gpu) >= seen["num_text_actors"]

    assert run_job_script(script, [*args, "--no-such-option"]) == 2  # the same parser rejects what it should


def test_train_entrypoint_is_accepted_by_the_job(monkeypatch):
    from pipeline.train import trainer

    script, args, env = _entrypoint("rayjob-train-ggm.yaml")
    seen = {}

    def record(cfg):
        seen["cfg"] = cfg
        raise trainer.TrainError("dry run")

    monkeypatch.setattr(trainer, "train", record)
    for key, value in env["env_vars"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run_job_script(script, args) == 2  # parsed, config built, stopped at train()
    cfg = seen["cfg"].resolved()
    storage = env["env_vars"]["ROICODEC_STORAGE"]
    assert cfg.variant == "ggm" and cfg.use_gpu and cfg.num_workers >= 2
    assert cfg.shards == f"{storage}/shards"
    assert cfg.storage_path == storage and cfg.mlflow_uri == f"sqlite:///{storage}/mlflow.db"

    # the service serves what this job registers, from the store it writes
    app = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["model_uri"] == f"models:/{cfg.registered_model}@champion"
    assert app["args"]["mlflow_tracking_uri"] == cfg.mlflow_uri


def _check_serve_config(config: dict) -> None:
    import importlib

    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    from pipeline.serve.settings import ServeSettings, deployment_options

    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        settings = ServeSettings.from_args(app["args"])  # the builder's own argument checks
        known = set(deployment_options(settings))
        assert {d["name"] for d in app["deployments"]} <= known


def test_serve_configs_validate_and_the_rayservice_reuses_serve_config():
    local = _yaml(CLUSTER / "serve_config.yaml")
    service = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    _check_serve_config(local)
    _check_serve_config(service)
    a, b = local["applications"][0], service["applications"][0]
    assert b["import_path"] == a["import_path"] and b["route_prefix"] == a["route_prefix"]
    assert b["deployments"] == a["deployments"]  # the same replicas and autoscaling
    cluster_only = {"model_uri", "mlflow_tracking_uri", "use_gpu", "clip_download"}
    assert {k: v for k, v in b["args"].items() if k not in cluster_only} == \
           {k: v for k, v in a["args"].items() if k not in cluster_only}
    assert b["args"]["use_gpu"] is True
    assert {k: v for k, v in service.items() if k != "applications"} == \
           {k: v for k, v in local.items() if k != "applications"}


def test_dockerfile_installs_the_project():
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    base = next(ln for ln in lines if ln.startswith("ARG BASE_IMAGE=")).split("=", 1)[1]
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any(ln.startswith("FROM ") for ln in lines)
    assert f"WORKDIR {IMAGE_ROOT}" in lines
    copied = " ".join(ln for ln in lines if ln.startswith("COPY "))
    for part in ("pyproject.toml", "README.md", "pipeline", "jobs"):
        assert part in copied
    assert re.search(r"pip install(\s+-\S+)*\s+\.(\s|$)", text)
    assert not re.search(r"torch(vision)?==", text)  # never pin torch; pip resolves the pair


def test_docs_cover_the_cluster_path():
    text = (ROOT / "README.md").read_text()
    assert "## Running on a cluster" in text
    for needle in ("ray up ray_cluster.yaml", "ray job submit", "--runtime-env cluster/runtime_env.yaml",
                   "jobs/preprocess_masks.py", "jobs/train_ggm.py", "ROICODEC_STORAGE",
                   *(f"kubectl apply -f cluster/kuberay/{m}" for m in MANIFESTS)):
        assert needle in text, needle


# -- storage: one setting, a path or a URI ------------------------------------------------------

def test_uri_storage_goes_to_ray_untouched(monkeypatch, tmp_path):
    from pipeline.train.trainer import TrainConfig, TrainOutcome, default_storage_path, run_config

    monkeypatch.setenv("ROICODEC_STORAGE", "s3://bucket/roicodec/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert default_storage_path() == "s3://bucket/roicodec"
    cfg = TrainConfig(shards=str(tmp_path), run_name="r1").resolved()
    assert cfg.storage_path == "s3://bucket/roicodec"
    assert cfg.mlflow_uri == "http://mlflow.internal:5000"
    rc = run_config(cfg, "run-id")
    assert rc.storage_path == "s3://bucket/roicodec" and rc.name == "r1"

    cfg = TrainConfig(shards=str(tmp_path), storage_path="gs://b/p", mlflow_uri="http://m:5000").resolved()
    assert run_config(cfg, "run-id").storage_path == "gs://b/p"
    out = TrainOutcome("r1", "gs://b/p/r1", "gs://b/p/r1/checkpoint_00000010", {}, "id", "http://m:5000",
                       False, None, None)
    assert out.summary()["model_file"] == "gs://b/p/r1/checkpoint_00000010/model.pt"


def test_uri_storage_needs_an_mlflow_server(monkeypatch, tmp_path, capsys):
    from pipeline.mlflow_store import resolve_tracking_uri
    from pipeline.train.trainer import TrainConfig, TrainError, cli_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrainError, match="--mlflow-uri"):
        TrainConfig(shards=str(tmp_path), storage_path="s3://bucket/runs").resolved()
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, storage_path="gs://bucket/runs")

    assert cli_main(["--shards", str(tmp_path), "--storage-path", "s3://bucket/runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--mlflow-uri" in err
    # --smoke generates shards under the storage path: not on an object store
    assert cli_main(["--smoke", "--storage-path", "gs://bucket/runs", "--mlflow-uri", "http://m:5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--shards" in err


def test_local_and_nfs_storage_paths(monkeypatch, tmp_path):
    from pipeline.train.trainer import TrainConfig, TrainError, default_storage_path, run_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ROICODEC_STORAGE", raising=False)
    assert default_storage_path() == str(Path("~/roicodec_runs").expanduser().resolve())  # the laptop default
    monkeypatch.setenv("ROICODEC_STORAGE", str(tmp_path / "nfs" / "roicodec"))
    cfg = TrainConfig(shards=str(tmp_path)).resolved()
    assert cfg.storage_path == str(tmp_path / "nfs" / "roicodec")
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path / 'nfs' / 'roicodec' / 'mlflow.db'}"
    assert run_config(cfg, "x").storage_path == cfg.storage_path
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(shards="s", storage_path="runs").resolved().storage_path == str(tmp_path / "runs")
    assert TrainConfig(shards="s", storage_path=f"file://{tmp_path}/a").resolved().storage_path == \
        str(tmp_path / "a")
    assert TrainConfig(shards="s", placement_strategy="spread").resolved().placement_strategy == "SPREAD"
    with pytest.raises(TrainError, match="placement strategy"):
        TrainConfig(shards="s", placement_strategy="EVERYWHERE").resolved()


# -- a real multi-node cluster ------------------------------------------------------------------

@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head and one more node process (2 logical CPUs each) on this machine.

    Its own Ray temp dir (short: socket paths) keeps the address file it writes away from
    other Ray users of this machine, whose ``ray.init()`` would otherwise connect to it.
    """
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # left over by an earlier test module
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _job(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_jobs_run_on_a_two_node_cluster(two_node_cluster, tmp_path):
    from mlflow import MlflowClient

    from pipeline.data.samples import write_sample_set
    from pipeline.data.shards import read_shards

    cluster = two_node_cluster
    sample = write_sample_set(tmp_path / "coco", n_images=6, size=(96, 96))  # images + COCO annotations
    storage = tmp_path / "storage"  # the one setting; a shared mount on a real cluster
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(RAY_ADDRESS=cluster.address, ROICODEC_STORAGE=str(storage), PYTHONUNBUFFERED="1")
    connected = f"Connecting to existing Ray cluster at address: {cluster.address}"

    # 1. mask preprocessing, as `ray job submit` runs it (driver with RAY_ADDRESS set)
    pre = _job(["jobs/preprocess_masks.py", "--input", str(sample.root), "--output", str(storage / "shards"),
                "--batch-size", "3", "-q"], env, timeout=300)
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert connected in pre.stderr  # it used the cluster, not a Ray of its own
    summary = json.loads(pre.stdout.strip().splitlines()[-1])
    assert summary["images"] == 6 and summary["rows_written"] > 0 and summary["error_rows"] == 0
    rows = read_shards(storage / "shards")
    assert rows.num_rows == summary["rows_written"] and rows.column("roi_mask").null_count == 0

    # 2. smoke training on those shards: two workers, one per node
    out = tmp_path / "outcome.json"
    train = _job(["jobs/train_ggm.py", "--smoke", "--shards", str(storage / "shards"), "--num-workers", "2",
                  "--cpus-per-worker", "0.5", "--placement-strategy", "STRICT_SPREAD", "--steps", "4",
                  "--checkpoint-every", "4", "--report-every", "2", "--run-name", "two-nodes",
                  "--json", str(out)], env, timeout=420)
    assert train.returncode == 0, train.stderr[-5000:]
    assert connected in train.stderr
    outcome = json.loads(out.read_text())
    assert outcome["metrics"]["step"] == 4
    # everything landed under ROICODEC_STORAGE (no --storage-path given)
    assert outcome["run_path"] == str(storage / "two-nodes")
    assert Path(outcome["model_file"]).is_file() and Path(outcome["model_file"]).is_relative_to(storage)
    assert outcome["mlflow_uri"] == f"sqlite:///{storage / 'mlflow.db'}"
    assert outcome["model_version"] == "1"

    ray.init(address=cluster.address, log_to_driver=False)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    run = MlflowClient(tracking_uri=outcome["mlflow_uri"]).get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    placement = json.loads(run.data.tags["worker_nodes"])  # recorded by the Ray Train controller
    assert set(placement) == nodes, "the two workers did not run on the two nodes"
    assert sorted(r for node in placement.values() for r in node["ranks"]) == [0, 1]
    assert run.data.tags["worker_node_count"] == "2"
