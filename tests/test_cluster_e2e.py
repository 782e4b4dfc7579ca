"""The pipeline as it runs on a cluster, on loopback: a search that keeps its state in S3 (a real S3 API, moto)
with an MLflow tracking server keeping its artifacts there, interrupted and resumed without reading the driver's
disk; and ``ray job submit`` of ``dvc repro`` to a Ray head started here.

Apart from :mod:`test_pipeline_e2e` (whose tests share one ``dvc repro`` project) so that ``make test``'s two
workers (pytest-xdist, one file each at a time) can run these beside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline_e2e import BIN, _background, _client, _copy_project, _env, _free_port, _wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def object_store_and_tracking_server(tmp_path):
    """A real S3 API (moto) and an MLflow tracking server keeping its artifacts in it, both on 127.0.0.1."""
    s3_port, mlflow_port = _free_port(), _free_port()
    aws = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env = dict(os.environ) | aws | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    servers = [
        subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    try:
        _wait_for(f"http://127.0.0.1:{s3_port}/")
        import boto3

        boto3.client(
            "s3",
            endpoint_url=aws["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ).create_bucket(Bucket="drtune")
        servers.append(
            subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination",
                    "s3://drtune/mlflow",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        _wait_for(f"http://127.0.0.1:{mlflow_port}/health")
        yield aws, f"http://127.0.0.1:{mlflow_port}"
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def test_a_search_on_s3_with_a_tracking_server_resumes_and_never_reads_the_drivers_disk(
    tmp_path, object_store_and_tracking_server
) -> None:
    """The cluster setting on loopback: Ray storage in S3 named in pyarrow's own URI form (the endpoint in its
    query, as MinIO and Ceph users write it; no AWS_ENDPOINT_URL), MLflow on a server with S3 artifacts, the
    prepared data gone from disk once the driver has read it, Ctrl-C after the first finished trial,
    then a rerun that resumes from S3, registers, and serves the champion from the server."""
    aws, tracking = object_store_and_tracking_server
    endpoint = aws["AWS_ENDPOINT_URL"].removeprefix("http://")
    root = _copy_project(
        tmp_path / "project",
        tune={"num_samples": 2, "early_stopping": False, "max_concurrent_trials": 1, "revalidate": "never"},
        ray={"storage_path": f"s3://drtune/runs?endpoint_override={endpoint}&scheme=http"},
    )
    env = _env(root) | {k: v for k, v in aws.items() if k != "AWS_ENDPOINT_URL"} | {"MLFLOW_TRACKING_URI": tracking}
    for stage in ("prepare", "baseline"):
        done = subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}"], cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    prepared, away = root / "data" / "prepared", root / "elsewhere"
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline.tune"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    finished = None
    for line in first.stdout:
        if prepared.exists() and " started with configuration" in line:
            prepared.rename(away)  # the driver has read it: from now on no process can
        if line.startswith("trial ") and " completed after " in line:
            finished = line.split()[1]
            os.killpg(first.pid, signal.SIGINT)  # Ctrl-C, as a user stops `dvc repro`
            break
    first.stdout.read()
    first.wait(timeout=120)
    assert finished is not None and first.returncode != 0 and away.exists()  # a trial trained without the folder
    away.rename(prepared)

    second = subprocess.run(
        [sys.executable, "-m", "pipeline.tune"], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"trial {finished} completed" not in second.stdout  # restored from S3, not run again
    summary = json.loads((root / "metrics" / "tune.json").read_text())
    assert summary["trials"] == 2 and summary["completed"] == 2
    assert json.loads((root / "models" / "best.json").read_text())["experiment_path"].startswith(
        "s3://drtune/runs/search-"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.register"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert not (root / "runs").exists() and not (root / "mlflow.db").exists()  # nothing local: S3 and the server
    import boto3

    keys = [
        o["Key"]
        for o in boto3.client(
            "s3",
            endpoint_url=aws["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ).list_objects_v2(Bucket="drtune", MaxKeys=1000)["Contents"]
    ]
    assert any(k.startswith("runs/train/") and k.endswith("/last.pt") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("model.safetensors") for k in keys)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking, registry_uri=tracking)
    exp = client.get_experiment_by_name("drtune-digits").experiment_id
    assert not client.search_runs([exp], filter_string="attributes.status = 'RUNNING'")
    assert len(client.search_runs([exp], filter_string="tags.`drtune.trial_id` != ''")) == 2
    assert str(client.get_model_version_by_alias("drtune-digits", "champion").version) == "1"
    load = (
        "import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/drtune-digits@champion'); "
        "print(len(m.predict(np.zeros((2, 8, 8, 3), np.uint8))))"
    )
    served = subprocess.run(
        [sys.executable, "-c", load], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert served.stdout.strip().endswith("2"), served.stderr[-3000:]


def test_ray_job_submit_runs_the_pipeline_on_a_head_started_here(tmp_path) -> None:
    # one trial, no re-validation: the job's path, not the search
    root = _copy_project(tmp_path / "project", tune={"num_samples": 1, "revalidate": "never"})
    env = _env(root) | {"RAY_AUTH_MODE": "disabled"}
    # every port its own: another Ray on this machine (a test beside this one) holds Ray's default agent port 52365,
    # and a head whose dashboard agent cannot listen accepts no job ("No available agent to submit job")
    dashboard, gcs, agent = _free_port(), _free_port(), _free_port()
    start = (
        f"start --head --block --port={gcs} --num-cpus=2 --dashboard-host=127.0.0.1 --dashboard-port={dashboard} "
        f"--dashboard-agent-listen-port={agent}"
    )
    resources = ["--resources", json.dumps({"drtune_trial_driver": 100})]
    head = _background(
        [str(BIN / "ray"), *start.split(), *resources, "--include-dashboard=true", "--disable-usage-stats"], root, env
    )
    try:
        runtime_env = {
            "excludes": [".git", ".venv", "data/", "runs/", "mlflow.db", "mlruns/", "models/"],
            "env_vars": {
                "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
                "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
                "DVC_NO_ANALYTICS": "1",
                "RAY_USAGE_STATS_ENABLED": "0",
            },
        }
        deadline = time.time() + 120
        cmd = [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dashboard}",
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "bash",
            "-c",
            "git init -q && dvc config --local core.no_scm true && dvc repro",
        ]
        while True:
            job = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
            starting = ("Connection refused", "No available agent to submit job")  # the head's job server, its agent
            if not any(s in job.stdout + job.stderr for s in starting) or time.time() > deadline:
                break
            time.sleep(2)  # the head is still starting
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-4000:]
        champion = _client(root).get_model_version_by_alias("drtune-digits", "champion")
        assert str(champion.version) == "1" and float(champion.tags["test_top1"]) > 0.3
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # stops only the head this test started
        head.wait(timeout=60)
        bootstrap = Path("/tmp/ray/ray_current_cluster")  # `ray stop` would remove its address; so do we
        if bootstrap.is_file() and bootstrap.read_text().strip().endswith(f":{gcs}"):
            bootstrap.unlink()
