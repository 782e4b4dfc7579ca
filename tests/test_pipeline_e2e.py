"""The pipeline end to end on the quick parameters: ``dvc repro`` in a temporary copy of the project,
the MLflow run tree, the registry's aliases and the pyfunc model, a NaN trial that fails alone, serving over HTTP,
and ``dvc exp run`` across methods. On S3, a tracking server and ``ray job submit``: :mod:`test_cluster_e2e`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from drtune.model_file import read_metadata
from pipeline.config import PRETRAINED_WEIGHTS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Diverges to NaN within the first epoch on the quick model (checked: loss nan at step 10).
NAN_POINT = {"lam": 1.0, "queue_size": 64, "lr_backbone": 8.0, "lr_head": 80.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '')}",
        DVC_SITE_CACHE_DIR=str(root / ".dvc" / "tmp" / "site"),
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="1",
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        PYTHONUNBUFFERED="1",
    )
    return env


def _copy_project(dest: Path, **sections) -> Path:
    """The committed and untracked project files (no results) in ``dest``, a git repo, quick params."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    dest.mkdir(parents=True)
    for name in files:
        if name.split("/")[0] in ("metrics", "plots") or name == "dvc.lock" or not (REPO / name).is_file():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    params = yaml.safe_load((REPO / "configs" / "quick.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def _background(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """A server process in its own session (so the test can stop its whole group), output discarded."""
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _wait_for(url: str, timeout: float = 90) -> None:
    import requests

    deadline = time.time() + timeout
    while True:
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """``dvc repro`` of the quick pipeline with 3 trials, the first of which diverges to NaN, from a backbone
    self-supervised (MoCo v2) on the training images beyond the label budget. The CE baseline's
    rates are set too low to learn in 3 epochs, so a DR-Tune trial is clearly the best candidate and the
    registry path of a searched model is what runs (the baseline's own wins are tested elsewhere)."""
    root = _copy_project(
        tmp_path_factory.mktemp("e2e") / "project",
        data={"unlabelled": "rest", "unlabelled_max": 256},
        pretrain={"method": "moco", "epochs": 2},
        train={"lr_backbone": 0.0001, "lr_head": 0.001},
        # a budget that holds; a greedy soup of the finished candidates
        tune={"num_samples": 3, "points_to_evaluate": [NAN_POINT], "time_budget_s": 3600, "soup": "greedy"},
    )
    start = time.time()
    done = subprocess.run(["dvc", "repro"], cwd=root, env=_env(root), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (root / "repro_seconds").write_text(f"{time.time() - start:.1f}")
    return root


def test_dvc_repro_writes_metrics_plots_and_model(project: Path) -> None:
    tune_summary = json.loads((project / "metrics" / "tune.json").read_text())
    test = json.loads((project / "metrics" / "test.json").read_text())
    baseline = json.loads((project / "metrics" / "baseline.json").read_text())
    assert tune_summary["trials"] == 3 and tune_summary["failed"] == 1  # the NaN trial failed alone
    best = json.loads((project / "models" / "best.json").read_text())
    assert best["budget"]["trials_run"] == 3 and not best["budget"]["budget_exhausted"]
    assert 0 < best["budget"]["search_s"] < 3600 and tune_summary["budget_exhausted"] == 0
    spent = json.loads((Path(best["experiment_path"]) / "drtune-time.json").read_text())["spent_s"]
    # stored beside the search for a resume: the same reading as best.json's, to its rounding
    assert spent == pytest.approx(
        best["budget"].get("search_and_revalidation_s", best["budget"]["search_s"]), abs=0.051
    )
    assert 0.3 < tune_summary["best_val_top1"] <= 1 and 0.3 < test["test_top1"] <= 1  # 10 classes: chance is 0.1
    soup = best["soup"]  # greedy: the pick first, and never below it on validation
    assert soup["recipe"] == "greedy" and soup["ingredients"][0] == best["best_trial"]
    assert soup["val_top1"] >= soup["pick_val_top1"]
    assert len(soup["tried"]) == tune_summary["completed"] + 1  # every completed trial and the baseline
    assert tune_summary["soup_ingredients"] == len(soup["ingredients"])
    assert test["lift_over_ce"] == pytest.approx(test["test_top1"] - baseline["test_top1"])
    for picture in ("learning_curve.png", "landscape.png", "confusion_matrix.png"):
        assert (project / "plots" / picture).stat().st_size > 5000
    env = _env(project)
    shown = subprocess.run(
        ["dvc", "metrics", "show", "--json"], cwd=project, env=env, capture_output=True, text=True, check=True
    )
    assert "test_top1" in shown.stdout
    plots = subprocess.run(
        ["dvc", "plots", "show", "--json"], cwd=project, env=env, capture_output=True, text=True, check=True
    )
    assert "lambda_vs_val_score" in plots.stdout and "metrics/tune_curve.csv" in plots.stdout
    status = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True)
    assert json.loads(status.stdout) == {"tracking": ["always changed"]}  # it reads the environment on every repro
    for name in ("baseline.json", "tune.json", "test.json"):  # DVC metrics files hold numbers only
        values = _leaves(json.loads((project / "metrics" / name).read_text()))
        assert all(v is None or isinstance(v, int | float) for v in values), (name, values)


def _leaves(tree) -> list:
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


def test_the_self_supervised_start_is_recorded_loaded_and_named_in_the_registry(project: Path) -> None:
    record = json.loads((project / "models" / "pretrained" / "pretrain.json").read_text())
    stats = json.loads((project / "data" / "prepared" / "stats.json").read_text())
    assert record["method"] == "moco" and record["epochs"] == 2 and record["images"] == 256
    assert stats["unlabelled"]["count"] == 256 and record["unlabelled_sha256"] == stats["unlabelled"]["sha256"]
    client = _client(project)
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["role"] == "pretrain"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "ssl_loss")] == [1, 2]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["digits-unlabelled"]
    # The search's trials and the baseline started from that backbone: their saved configs name it.
    for model in ("best.safetensors", "baseline.safetensors"):
        assert read_metadata(project / "models" / model)["params"]["model"]["pretrained"] == PRETRAINED_WEIGHTS
    version = client.get_model_version_by_alias("drtune-digits", "champion")
    assert "Self-supervised start**: MoCo v2, 2 epochs on 256 unlabelled images" in version.description
    assert version.tags["pretrain"].startswith("MoCo v2, 2 epochs")


def test_mlflow_run_tree(project: Path) -> None:
    client = _client(project)
    exp = client.get_experiment_by_name("drtune-digits")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("drtune.ray_experiment")]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_ids = [r.data.tags["drtune.trial_id"] for r in children]
    assert len(children) == 3 and len(set(trial_ids)) == 3  # one run per trial, none twice
    statuses = sorted(r.info.status for r in children)
    assert statuses == ["FAILED", "FINISHED", "FINISHED"] and parent.info.status == "FINISHED"
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "nan" in failed.data.tags["error"].lower() and float(failed.data.params["lr_backbone"]) == 8.0
    for run in children:
        if run.info.status == "FINISHED":
            epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
            assert epochs == sorted(set(epochs)) and epochs[0] == 1
            cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
            assert [m.step for m in cpu] == epochs and all(0 <= m.value <= 100 * os.cpu_count() for m in cpu)
    for tag in ("git_commit", "data_sha256", "ray_experiment_path"):
        assert parent.data.tags[tag]
    assert {"test_top1", "ce_baseline_test_top1", "lift_over_ce"} <= set(parent.data.metrics)
    assert {"plots"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    baseline = [r for r in runs if r.data.tags.get("role") == "ce-baseline"]
    assert len(baseline) == 1 and baseline[0].info.status == "FINISHED"


def test_a_new_tracking_store_is_a_change_dvc_sees(project: Path) -> None:
    """DVC cannot see MLFLOW_TRACKING_URI; the tracking stage turns it into a file, so the stages whose runs
    live in the store (baseline, tune, register) are out of date on a new server, and current again on the old."""
    env = _env(project)

    def out_of_date(uri: str) -> dict:
        subprocess.run(["dvc", "repro", "tracking"], cwd=project, env=env | {"MLFLOW_TRACKING_URI": uri}, check=True)
        status = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True)
        return json.loads(status.stdout)

    moved = out_of_date("http://user:token@mlflow.internal:5000")
    assert set(moved) == {"tracking", "baseline", "tune", "register"}
    assert all(moved[s] == [{"changed deps": {"models/tracking.json": "modified"}}] for s in ("baseline", "tune"))
    assert "token" not in (project / "models" / "tracking.json").read_text()  # written redacted
    assert out_of_date(env["MLFLOW_TRACKING_URI"]) == {"tracking": ["always changed"]}


def test_the_registry_and_runs_as_a_person_browses_them(project: Path) -> None:
    """The experiment opens on its training runs, every training run names its data, the baseline
    run spans its training, the parent shows the winner's values, and the registry says what the model is."""
    client = _client(project)
    exp = client.get_experiment_by_name("drtune-digits")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    stats = json.loads((project / "data" / "prepared" / "stats.json").read_text())
    runs = client.search_runs([exp.experiment_id])
    training = [
        r
        for r in runs
        if r.data.tags.get("role") == "ce-baseline"
        or "drtune.trial_id" in r.data.tags
        or "drtune.ray_experiment" in r.data.tags
    ]
    assert len(training) == 5  # baseline, parent, 3 trials
    for run in training:
        logged = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
        assert logged == {("digits-train", stats["sha256"]["train"][:16]), ("digits-val", stats["sha256"]["val"][:16])}
    baseline = next(r for r in runs if r.data.tags.get("role") == "ce-baseline")
    wall = json.loads((project / "metrics" / "baseline.json").read_text())["wall_s"]
    # opened before training started (wall_s is rounded to 0.1 s)
    assert (baseline.info.end_time - baseline.info.start_time) / 1000 >= wall - 0.05
    assert [m.step for m in client.get_metric_history(baseline.info.run_id, "val_top1")] == [1, 2, 3]
    assert {"train_ce", "epoch_s", "images_per_s", "lr_head"} <= set(baseline.data.metrics)
    parent = next(r for r in runs if "drtune.ray_experiment" in r.data.tags)
    best = json.loads((project / "metrics" / "tune.json").read_text())["best"]
    chosen = json.loads((project / "models" / "best.json").read_text())
    assert chosen["selection"]["rule"] == "clear" and chosen["leaderboard"]["ce"]["best_trial"] == "baseline"
    assert float(parent.data.params["best.lam"]) == pytest.approx(best["lam"])
    version = client.get_model_version_by_alias("drtune-digits", "champion")
    assert version.tags["method"] == "drtune" and float(version.tags["drtune.lam"]) == pytest.approx(best["lam"])
    test = json.loads((project / "metrics" / "test.json").read_text())
    assert test["temperature"] > 0 and 0 <= test["test_ece"] <= 1 and 0 <= test["test_ece_before"] <= 1
    assert float(version.tags["temperature"]) == pytest.approx(test["temperature"], abs=1e-4)
    assert "**Calibrated probabilities**: temperature" in version.description
    assert (project / "plots" / "reliability.png").stat().st_size > 5000
    for text in (version.description, client.get_registered_model("drtune-digits").description):
        assert "test_efficientnet" in text and "DR-Tune" in text and "`drtune.lam`" in text
        assert "models:/drtune-digits@champion" in text and "mlflow models serve" in text
        assert f"Test top-1 {float(version.tags['test_top1']):.4f}" in text and "CE-tuning" in text


def test_registry_champion_loads_and_a_model_that_is_not_better_stays_challenger(project: Path) -> None:
    import mlflow

    client = _client(project)
    v1 = client.get_model_version_by_alias("drtune-digits", "champion")
    assert str(v1.version) == "1" and float(v1.tags["test_top1"]) > 0.3 and "lift_over_ce" in v1.tags
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/drtune-digits@champion")
    from drtune.prepared import load_prepared

    test = load_prepared(project / "data" / "prepared").test
    images = np.repeat(test.images[:8], 3, axis=-1)
    out = model.predict(images)
    assert len(out) == 8 and set(out["label"]) <= {str(d) for d in range(10)}
    # its probabilities are the search's model's, temperature-scaled: softmax(logits / T)
    from drtune.inference import load_predictor
    from drtune.temperature import probabilities

    plain = load_predictor(project / "models" / "best.safetensors").predict_proba(images)
    temperature = json.loads((project / "metrics" / "test.json").read_text())["temperature"]
    assert np.allclose(np.stack(out["probabilities"]), probabilities(np.log(plain), temperature), atol=1e-4)
    # `drtune predict` takes the registry URI and the pipeline's model file, and agrees with the pyfunc.
    from PIL import Image

    photos = project.parent / "photos"  # outside the project: its git tree stays as the pipeline left it
    photos.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(photos / f"{i}.png")
    for source in ("models:/drtune-digits@champion", "models/best.safetensors"):
        cli = subprocess.run(
            [str(BIN / "drtune"), "predict", source, str(photos), "--output", str(photos / "p.csv")],
            cwd=project,
            env=_env(project),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cli.returncode == 0, cli.stderr[-2000:]
        labels = [row.split(",")[1] for row in (photos / "p.csv").read_text().splitlines()[1:]]
        assert labels == list(out["label"]), source
    # The same checkpoint registered again is the same version, not a second one.
    register = [sys.executable, "-m", "pipeline.register", "--params", "params.yaml"]
    again = subprocess.run(register, cwd=project, env=_env(project), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [str(v.version) for v in client.search_model_versions("name = 'drtune-digits'")] == ["1"]
    assert "already champion" in json.loads((project / "models" / "registered.json").read_text())["decision"]
    # Another checkpoint of the same weights scores the same: it becomes challenger, not champion.
    from drtune.model_file import read_model, save_model

    best = read_model(project / "models" / "best.safetensors")
    save_model(
        project / "models" / "best.safetensors",
        best.tensors,
        best.params | {"note": "same weights, another file"},
        best.classes,
        best.history,
    )
    record_path = project / "models" / "best.json"
    record = json.loads(record_path.read_text())
    refused = subprocess.run(register, cwd=project, env=_env(project), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "is not the model models/best.json describes" in refused.stderr
    record["best_sha256"] = read_model(project / "models" / "best.safetensors").sha256  # as tune would write it
    record_path.write_text(json.dumps(record))
    again = subprocess.run(register, cwd=project, env=_env(project), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert str(client.get_model_version_by_alias("drtune-digits", "challenger").version) == "2"
    assert str(client.get_model_version_by_alias("drtune-digits", "champion").version) == "1"
    decision = json.loads((project / "metrics" / "test.json").read_text())
    assert decision["promoted"] == 0
    assert decision["champion_test_top1_before"] == pytest.approx(float(v1.tags["test_top1"]), abs=1e-4)


def test_mlflow_models_serve_answers_http(project: Path) -> None:
    import requests

    port = _free_port()
    env = _env(project) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    serve = f"models serve -m models:/drtune-digits@champion --env-manager local -h 127.0.0.1 -p {port} -w 1"
    server = _background([str(BIN / "mlflow"), *serve.split()], project, env)
    try:
        images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).tolist()
        deadline = time.time() + 120
        while True:
            try:
                reply = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images}, timeout=30)
                break
            except requests.ConnectionError:
                assert time.time() < deadline and server.poll() is None, "mlflow models serve did not come up"
                time.sleep(1)
        assert reply.status_code == 200, reply.text
        rows = reply.json()["predictions"]
        assert len(rows) == 2 and {"label", "class_index", "probability", "probabilities"} <= set(rows[0])
        assert abs(sum(rows[0]["probabilities"]) - 1) < 1e-4
        two_channels = np.zeros((1, 8, 8, 2), np.uint8).tolist()
        bad = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": two_channels}, timeout=30)
        assert bad.status_code == 400 and "expected H × W × C (C = 1, 3 or 4)" in bad.json()["message"]
        assert "Traceback" not in bad.text and str(project) not in bad.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_dvc_exp_run_of_a_search_across_methods_reruns_only_tune_and_register_with_a_leaderboard(project: Path) -> None:
    env = _env(project)
    for cmd in (
        ["git", "add", "dvc.lock", "metrics", "plots"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "quick run"],
    ):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    # No early stopping: one trial per method (each method's starting point), and the top two candidates
    # (of the two trials and the CE baseline) are always re-validated on one more fold; chosen by macro-F1,
    # so every judge (the pick's permutation test, the leaderboard, the gate) works on a metric other than top-1.
    exp = subprocess.run(
        [
            "dvc",
            "exp",
            "run",
            "-S",
            "tune.methods=[drtune,linear_probe]",
            "-S",
            "tune.num_samples=2",
            "-S",
            "tune.early_stopping=false",
            "-S",
            "tune.revalidate=always",
            "-S",
            "tune.finalists=2",
            "-S",
            "tune.finalist_folds=1",
            "-S",
            "tune.metric=macro_f1",
            "-S",
            "tune.soup=uniform",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = exp.stdout + exp.stderr
    assert exp.returncode == 0, out[-4000:]
    assert "Running stage 'tune'" in out and "Running stage 'register'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'baseline'" not in out
    assert json.loads((project / "metrics" / "tune.json").read_text())["trials"] == 2
    board = json.loads((project / "metrics" / "leaderboard.json").read_text())
    assert (
        board["drtune.completed"] == board["linear_probe.completed"] == 1 and "drtune_val_lift_over_best_other" in board
    )
    assert board["ce.trials"] == 0 and board["ce.completed"] == 1  # the baseline, on the leaderboard as CE-tuning
    test = json.loads((project / "metrics" / "test.json").read_text())
    assert {
        "drtune.test_macro_f1",
        "linear_probe.test_macro_f1",
        "ce.test_macro_f1",
        "drtune_test_lift_over_best_other",
    } <= set(test)
    baseline = json.loads((project / "metrics" / "baseline.json").read_text())
    assert test["ce.test_macro_f1"] == baseline["test_macro_f1"]
    assert test["lift_over_ce"] == pytest.approx(test["test_macro_f1"] - baseline["test_macro_f1"])
    assert "drtune.best_val_macro_f1" in board
    chosen = json.loads((project / "models" / "best.json").read_text())
    selection = chosen["selection"]
    assert selection["rule"] in ("revalidated", "conservative") and len(chosen["finalists"]) == 2
    n_val = sum(json.loads((project / "data" / "prepared" / "stats.json").read_text())["counts"]["val"])
    assert selection["scored_on_images"] == 2 * n_val  # its own split and one more fold
    assert selection["comparison"]["paired"]  # the finalists compared image by image on all 2 × n_val images
    assert selection["comparison"]["test"] == "permutation"
    scores = {row["trial"]: row for row in chosen["finalists"]}
    assert all(row["folds"] == 2 for row in scores.values())
    if selection["rule"] == "revalidated":
        assert chosen["best_trial"] == max(scores, key=lambda t: scores[t]["cv_macro_f1"])
    else:
        assert "baseline" not in scores or chosen["best_trial"] == "baseline"
    assert chosen["leaderboard"][chosen["best_method"]]["best_trial"] == chosen["best_trial"]
    client = _client(project)
    version = json.loads((project / "models" / "registered.json").read_text())["version"]
    assert client.get_model_version("drtune-digits", version).tags["method"] == chosen["best_method"]
    assert client.get_model_version("drtune-digits", version).tags["selection_rule"] == selection["rule"]
    parent = client.get_run(chosen["mlflow_parent_run_id"])
    assert parent.data.tags["best_method"] == chosen["best_method"]
    assert (
        parent.data.tags["selection"] == selection["rule"]
        and parent.data.tags["selection_reason"] == selection["reason"]
    )
    assert {"leaderboard.json", "leaderboard_val.json", "selection.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    trials = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {
        t.data.tags["drtune.trial_id"]: t.data.metrics["cv_macro_f1"] for t in trials if "cv_macro_f1" in t.data.metrics
    } == pytest.approx({trial: row["cv_macro_f1"] for trial, row in scores.items() if trial != "baseline"})
    assert "per_class_test.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the uniform soup of the pick and the two other completed candidates is the registered model, and loads
    soup = chosen["soup"]
    assert (
        soup["recipe"] == "uniform" and len(soup["ingredients"]) == 3 and soup["ingredients"][0] == chosen["best_trial"]
    )
    registered = client.get_model_version("drtune-digits", version)
    assert (
        registered.tags["soup"] == " + ".join(soup["ingredients"])
        and "**Model soup** (uniform" in registered.description
    )
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    predicted = mlflow.pyfunc.load_model(f"models:/drtune-digits/{version}").predict(np.zeros((2, 8, 8, 3), np.uint8))
    assert len(predicted) == 2
    probes = [t for t in trials if t.data.params.get("method") == "linear_probe"]
    assert probes and all(set(t.data.params) == {"method", "linear_probe.lr_head"} for t in probes)  # never λ
