"""Pipeline pieces without a cluster: settings, the Optuna/ASHA bridge, trial selection, the champion
gate, the tracking check and the pyfunc model's inputs."""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from ray import tune

from drtune import methods
from drtune.config import ConfigError
from drtune.inference import Predictor, to_chw
from drtune.mlflow_model import DRTuneClassifier
from drtune.task import Classifier
from pipeline.champion import decide
from pipeline.config import PipelineConfig, load
from pipeline.mlflow_connect import TrackingUnavailableError, connect
from pipeline.model_card import model_description
from pipeline.search import require_finished
from pipeline.searcher import PruningOptunaSearch, search_space
from pipeline.space import field_of, random_point, searched_names, starting_points, trial_config


def test_queue_size_that_does_not_divide_the_global_batch_names_the_fields() -> None:
    with pytest.raises(ConfigError, match=r"tune.queue_sizes \[100\].*global batch 64.*ray.workers_per_trial 2"):
        load(None, ["train.batch_size=32", "ray.workers_per_trial=2", "tune.queue_sizes=[128, 100]"])


def test_bad_ranges_and_keys_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"tune.lam.*must not exceed"):
        load(None, ["tune.lam={low: 5, high: 1}"])
    with pytest.raises(ConfigError, match=r"tune.lr_head.low.*greater than 0"):
        load(None, ["tune.lr_head={low: 0, high: 1}"])
    with pytest.raises(ConfigError, match=r"ray.bogus.*Extra inputs"):
        load(None, ["ray.bogus=1"])
    with pytest.raises(ConfigError, match=r"tune.grace_period = 5 exceeds train.epochs = 2"):
        load(None, ["train.epochs=2", "tune.grace_period=5"])
    p = load(None, ["tune.points_to_evaluate=[{lam: 1.0, lr_heed: 0.1}]"])
    with pytest.raises(ConfigError, match=r"tune.points_to_evaluate\[0\]: unknown names \['lr_heed'\]"):
        starting_points(p)
    with pytest.raises(ConfigError, match=r"tune.points_to_evaluate\[0\].queue_size = 1024 is not in tune.queue_sizes"):
        starting_points(load(None, ["tune.queue_sizes=[256]", "tune.points_to_evaluate=[{lam: 1.0}]"]))


def test_starting_points_fit_each_method() -> None:
    """The default points (DR-Tune's) serve every method: other names dropped, missing ones from the config."""
    assert starting_points(load(None, ["train.method=linear_probe"])) == [{"lr_head": 0.1}, {"lr_head": 0.01}]
    l2sp = starting_points(load(None, ["train.method=l2sp", "baselines.l2sp_alpha=0.5"]))
    assert l2sp[1] == {"lr_head": 0.01, "lr_backbone": 0.000303, "l2sp_alpha": 0.5, "l2sp_beta": 0.01}


def test_the_shipped_parameter_files_are_valid() -> None:
    for path in ("params.yaml", "configs/quick.yaml"):
        p = load(path)
        search_space(p)
        starting_points(p)
    default = load("params.yaml")
    lo, hi = default.tune.lr_backbone.low, default.tune.lr_backbone.high
    reference_rate = default.train.lr_backbone / (1 + 1024 / default.train.batch_size)
    assert (
        lo <= reference_rate <= hi and lo <= default.train.lr_backbone <= hi
    )  # reference and CE-like rates both inside


def test_trial_config_sets_real_step_sizes_and_keeps_the_reference_preset_for_the_library() -> None:
    p = trial_config(load(None), {"lam": 3.0, "queue_size": 512, "lr_backbone": 0.02, "lr_head": 0.2})
    assert type(p).__name__ == "Config" and not hasattr(p, "tune")  # workers get the library's config only
    assert p.drtune.lam == 3.0 and p.drtune.queue_size == 512 and p.train.lr_backbone == 0.02 and p.train.lr_head == 0.2
    base = load(None, ["drtune.preset=reference", "drtune.queue_size=1024"])
    assert set(search_space(base)) == {"lr_backbone", "queue_size"}  # λ and the rates follow from K and r
    resolved = trial_config(base, {"lr_backbone": 0.05, "queue_size": 512}).resolved()
    assert resolved.drtune.lam == 512 / 32 and resolved.train.lr_head == 0.05


def test_params_yaml_states_the_schema_defaults() -> None:
    """Each default is written once, in the schema; params.yaml shows the same values with comments."""
    assert load("params.yaml") == PipelineConfig()


def test_every_searched_name_maps_to_a_config_field_and_a_range() -> None:
    config = PipelineConfig()
    for knob in methods.all_knobs():
        section, key = field_of(knob.name).split(".")
        assert key in type(getattr(config, section)).model_fields
        assert knob.name in type(config.tune).model_fields or knob.choice


def _searcher(max_epochs: int = 4) -> PruningOptunaSearch:
    s = PruningOptunaSearch(
        space={"x": tune.uniform(0, 1)},
        metric="val_top1",
        mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0),
        max_epochs=max_epochs,
    )
    return s


def test_asha_stopped_trials_are_pruned_in_optuna_and_failures_fail() -> None:
    s = _searcher()
    for tid in ("full", "stopped", "nan", "error"):
        s.suggest(tid)
        s.on_trial_result(tid, {"val_top1": 0.5, "training_iteration": 1, "epoch": 1})
    s.on_trial_complete("full", {"val_top1": 0.7, "epoch": 4})
    s.on_trial_complete("stopped", {"val_top1": 0.9, "epoch": 1})
    s.on_trial_complete("nan", {"val_top1": float("nan"), "epoch": 4})
    s.on_trial_complete("error", {"val_top1": 0.8, "epoch": 2}, error=True)
    states = [t.state for t in s._ot_study.trials]
    TS = optuna.trial.TrialState
    assert states == [TS.COMPLETE, TS.PRUNED, TS.FAIL, TS.FAIL]
    assert s._ot_study.best_value == 0.7  # a stopped trial's early score never becomes "best"


def test_champion_gate() -> None:
    assert decide(0.80, None, "no champion yet") == (True, "promoted: no champion yet")
    promoted, why = decide(0.70, 0.75, "re-scored on this test split")
    assert not promoted and "0.7000 ≤ champion's 0.7500" in why
    assert not decide(0.75, 0.75, "re-scored")[0]  # a tie does not take champion
    assert decide(0.76, 0.75, "re-scored")[0]
    assert not decide(0.99, None, "champion was trained on other classes; not comparable")[0]


def test_unreachable_tracking_server_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    start = time.time()
    with pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port} is unreachable"):
        connect(f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.time() - start < 5
    with pytest.raises(TrackingUnavailableError, match="needs a database"):
        connect("file:./mlruns")


def test_a_server_that_does_not_answer_is_told_from_one_that_refuses_by_type_and_status(monkeypatch) -> None:
    """What MLflow's REST client really raises: a dead server or a 503 until the retries run out is
    unreachable; a 404 or 400 answer is a refusal, whatever its message says."""
    import http.server
    import threading

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_connect import unreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")

    def error_of(uri: str) -> Exception:
        with pytest.raises(Exception) as caught:
            MlflowClient(uri).search_experiments(max_results=1)
        return caught.value

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    assert unreachable(error_of(f"http://127.0.0.1:{port}"))
    for status, body, expected in [
        (503, b"<html>down</html>", True),
        (503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', True),
        (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "503"}', False),
        (400, b"Connection refused; timed out", False),
    ]:

        class Answer(http.server.BaseHTTPRequestHandler):
            def do_GET(self, status=status, body=body):
                self.send_response(status)
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            assert unreachable(error_of(f"http://127.0.0.1:{server.server_port}")) is expected, (status, body)
        finally:
            server.shutdown()
            server.server_close()
    assert not unreachable(MlflowException("run 503abc: Max retries exceeded"))  # the text alone says nothing


def _predictor(tiny_encoder) -> Predictor:
    return Predictor(
        Classifier(tiny_encoder, 3),
        ["cat", "dog", "owl"],
        16,
        {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 1.0},
    )


def test_pyfunc_accepts_uint8_hwc_of_any_size_and_float_nchw(tiny_encoder) -> None:
    model = DRTuneClassifier()
    model.predictor = _predictor(tiny_encoder)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (4, 20, 24, 3), dtype=np.uint8)
    out = model.predict(None, batch)
    assert list(out.columns) == ["label", "class_index", "probability", "probabilities"]
    assert set(out["label"]) <= {"cat", "dog", "owl"} and np.allclose(
        [sum(p) for p in out["probabilities"]], 1, atol=1e-5
    )
    as_float = model.predict(None, batch.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert (as_float["class_index"] == out["class_index"]).all()  # same images, same answers
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = batch[0], rng.integers(0, 256, (40, 12), dtype=np.uint8)  # second one grey, other size
    assert len(model.predict(None, ragged)) == 2
    json_like = np.array(batch[:2].tolist(), dtype=object)  # nested lists as an object array
    assert (model.predict(None, json_like)["class_index"] == out["class_index"][:2]).all()
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"expected H × W × C \(C = 1, 3 or 4\)"):
        model.predict(None, np.zeros((1, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="N × C × H × W"):
        to_chw(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got 0 … 255"):  # 0–255 floats are not clipped to white
        to_chw(batch.transpose(0, 3, 1, 2).astype(np.float32))
    # 1 × 2,000 px would be resized by its shorter side to 64 × 128,000: refused with the reason (HTTP 400)
    with pytest.raises(MlflowException, match=r"image 0: 2000 × 1 px is more elongated than 20:1") as refused:
        model.predict(None, np.zeros((1, 1, 2000, 3), np.uint8))
    assert refused.value.get_http_status_code() == 400


@pytest.mark.parametrize(
    "method, keys",
    [
        ("drtune", {"lr_backbone", "lr_head", "lam", "queue_size"}),
        ("ce", {"lr_backbone", "lr_head"}),
        ("linear_probe", {"lr_head"}),
        ("l2sp", {"lr_backbone", "lr_head", "l2sp_alpha", "l2sp_beta"}),
        ("bss", {"lr_backbone", "lr_head", "bss_eta"}),
    ],
)
def test_each_method_searches_its_own_hyperparameters(method, keys) -> None:
    p = load(None, [f"train.method={method}"])
    assert set(search_space(p)) == keys
    values = {
        "lr_backbone": 0.02,
        "lr_head": 0.2,
        "lam": 2.0,
        "queue_size": 512,
        "l2sp_alpha": 0.3,
        "l2sp_beta": 0.4,
        "bss_eta": 0.05,
    }
    trial = trial_config(p, {k: values[k] for k in keys})
    assert trial.train.lr_head == 0.2 and (method != "l2sp" or trial.baselines.l2sp_beta == 0.4)
    assert method != "bss" or trial.baselines.bss_eta == 0.05


def test_a_dead_ray_head_left_in_the_bootstrap_file_is_forgotten(tmp_path, monkeypatch) -> None:
    from pipeline import compat
    from pipeline.cluster import _live_local_head

    assert compat.ray_address_file().name == "ray_current_cluster"  # Ray still keeps it where compat looks
    address_file = tmp_path / "ray_current_cluster"
    monkeypatch.setattr(compat, "ray_address_file", lambda: address_file)
    address_file.write_text("10.0.0.1:6379")
    monkeypatch.setattr(compat, "live_gcs_addresses", lambda: frozenset({"10.0.0.1:6379"}))
    assert _live_local_head() == "10.0.0.1:6379"  # a live head is joined
    monkeypatch.setattr(compat, "live_gcs_addresses", lambda: frozenset())
    assert _live_local_head() is None and not address_file.exists()  # a dead one is forgotten


def test_run_name_follows_settings_data_and_code(monkeypatch) -> None:
    from pipeline import training

    p = load("params.yaml")
    name = training.run_name("search", p, "sha-a")
    assert training.run_name("search", p, "sha-a") == name  # a rerun of the same search restores it
    assert training.run_name("search", p, "sha-b") != name
    assert training.run_name("baseline-ce", p, "sha-a") != name
    changed = p.model_copy(deep=True)
    changed.drtune.rotation_every = 5
    assert training.run_name("search", changed, "sha-a") != name
    monkeypatch.setattr(training, "code_digest", lambda: "edited library")
    assert training.run_name("search", p, "sha-a") != name  # DVC reran the stage for a code change: start afresh


@pytest.mark.parametrize(
    "method,stated,absent",
    [("drtune", "`drtune.queue_size` | 512", "l2sp"), ("linear_probe", "`train.lr_head` | 0.2", "lr_backbone")],
)
def test_model_description_states_what_the_model_is_and_how_to_call_it(method, stated, absent) -> None:
    params = PipelineConfig().library().model_dump(mode="json")
    params["train"].update(method=method, lr_head=0.2)
    params["drtune"]["queue_size"] = 512
    stats = {
        "dataset": "fashion-mnist",
        "counts": {"train": [48] * 10, "val": [12] * 10, "test": [1000] * 10},
        "sha256": {"train": "ab" * 32},
    }
    text = model_description(
        "drtune-fashion-mnist",
        "3",
        params,
        [f"c{i}" for i in range(10)],
        stats,
        {"top1": 0.8, "balanced_accuracy": 0.79, "macro_f1": 0.78, "top5": 0.99, "n": 10000},
        0.75,
        "promoted: no champion yet",
    )
    assert stated in text and absent not in text
    assert "tf_efficientnet_lite0" in text and "480 training" in text and "64 × 64 px" in text
    assert "lift **+0.0500**" in text and 'load_model("models:/drtune-fashion-mnist@champion")' in text


@pytest.mark.parametrize("stage", ["tune", "baseline"])
def test_a_bad_model_setting_stops_the_stage_before_ray_in_one_line(tmp_path, monkeypatch, capsys, stage) -> None:
    """What a worker would reject is named before Ray starts, and no MLflow run is left behind."""
    import importlib

    import ray
    import yaml

    from drtune.prepared import write_prepared

    params = yaml.safe_load(open("configs/quick.yaml"))
    monkeypatch.chdir(tmp_path)  # the stage's root: not a project whose models/ a `make run` has filled
    params["data"]["prepared_dir"] = str(tmp_path / "prepared")
    params["ray"]["storage_path"] = str(tmp_path / "ray")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_prepared(load(tmp_path / "params.yaml").data)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    module = importlib.import_module(f"pipeline.{stage}")
    assert module.main(["--params", str(tmp_path / "params.yaml"), "--set", "model.name=nosuchmodel_xyz"]) == 2
    err = capsys.readouterr().err
    assert f"{stage}: model.name = 'nosuchmodel_xyz': timm has no such model" in err and "Traceback" not in err
    assert not ray.is_initialized()
    client = connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not [r for r in client.search_runs(experiments) if r.info.status == "RUNNING"]


def test_a_request_the_cluster_cannot_meet_now_fails_locally_and_waits_on_a_joined_cluster(monkeypatch) -> None:
    from pipeline import cluster

    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 8.0, cluster.DRIVER_RESOURCE: 100.0})
    gpu = load(None, ["ray.gpus_per_worker=1"])
    monkeypatch.setitem(cluster._private, "ray", True)
    with pytest.raises(ConfigError, match=r"one trial needs 2 CPU and 1 GPU .* the cluster has 8 CPU and 0 GPU"):
        cluster.trial_resources(gpu)
    monkeypatch.setitem(cluster._private, "ray", False)
    with pytest.warns(UserWarning, match="trials wait until nodes join"):
        assert cluster.trial_resources(gpu) == ({"CPU": 0, cluster.DRIVER_RESOURCE: 1}, None)
    assert cluster.trial_resources(load(None, ["ray.cpus_per_worker=2"]))[1] == 4  # 8 CPU / 2 per trial


def test_every_params_key_a_stage_lists_is_in_both_parameter_files() -> None:
    """DVC refuses to run a stage whose listed key is missing from params.yaml: the quick file is one too."""
    import yaml

    stages = yaml.safe_load(open("dvc.yaml"))["stages"]
    for path in ("params.yaml", "configs/quick.yaml"):
        tree = yaml.safe_load(open(path))
        for name, stage in stages.items():
            for key in stage.get("params", []):
                node = tree
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"{path} lacks {key} ({name} stage)"
                    node = node[part]


def test_each_stage_lists_every_pipeline_module_it_imports() -> None:
    """DVC reruns a stage when a dependency changes: every ``pipeline`` module a stage imports, directly
    or through another, must be among its deps."""
    import ast
    from pathlib import Path

    import yaml

    def imports(module: str) -> set[str]:
        tree = ast.parse(Path(f"pipeline/{module}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
                found.add(node.module.split(".")[1])
        return found

    for name, stage in yaml.safe_load(open("dvc.yaml"))["stages"].items():
        start = stage["cmd"].split("-m pipeline.")[1].split()[0]
        needed, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module not in needed:
                needed.add(module)
                todo += imports(module)
        missing = sorted(f"pipeline/{m}.py" for m in needed if f"pipeline/{m}.py" not in stage["deps"])
        assert not missing, f"stage {name} imports {missing} but does not list them"


def test_a_cut_search_state_file_is_named_with_the_command_that_starts_afresh(tmp_path) -> None:
    import json
    import pickle

    from pipeline.experiment_state import ExperimentStateError, check_experiment_state

    stamp = "2026-01-01_00-00-00"
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1}))
    (tmp_path / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": []}))
    (tmp_path / f"search_gen_state-{stamp}.json").write_bytes(pickle.dumps({"counter": 1}))
    searcher = pickle.dumps({"space": list(range(100))})
    (tmp_path / f"searcher-state-{stamp}.pkl").write_bytes(searcher)
    check_experiment_state(str(tmp_path))  # whole: no error
    (tmp_path / f"searcher-state-{stamp}.pkl").write_bytes(searcher[:20])
    with pytest.raises(ExperimentStateError, match=rf"searcher-state-{stamp}.pkl cannot be read.*--fresh"):
        check_experiment_state(str(tmp_path))
    grid = tmp_path / "grid"  # the re-validation: a grid, whose generator stores basic-variant-state, no searcher
    grid.mkdir()
    for name in ("tuner.pkl", f"basic-variant-state-{stamp}.json"):
        (grid / name).write_bytes(pickle.dumps({"iterators": list(range(100))}))
    (grid / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": []}))
    check_experiment_state(str(grid))
    (grid / f"basic-variant-state-{stamp}.json").write_bytes(b"")
    with pytest.raises(ExperimentStateError, match=rf"basic-variant-state-{stamp}.json cannot be read"):
        check_experiment_state(str(grid))


def test_trial_runs_hold_writes_while_the_server_is_away_and_log_each_epoch_once(tmp_path) -> None:
    """The callback against a real SQLite store behind a switch that makes every call fail as a dead server's."""
    import requests
    from mlflow.tracking import MlflowClient

    from pipeline.trial_runs import TrialRuns

    real = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = real.create_experiment("e")
    parent = real.create_run(exp).info.run_id
    away = {"now": False}

    class Switch:
        def __getattr__(self, name):
            method = getattr(real, name)

            def call(*args, **kwargs):
                if away["now"]:
                    raise requests.ConnectionError("Connection refused")
                return method(*args, **kwargs)

            return call

    runs = TrialRuns(Switch(), exp, parent, max_epochs=2)
    trial = SimpleNamespace(trial_id="t1", config={"lam": 1.0}, last_result={"epoch": 2, "val_top1": 0.5})
    runs.on_trial_start(0, [], trial)
    runs.on_trial_result(0, [], trial, {"epoch": 1, "val_top1": 0.4})
    away["now"] = True
    runs.on_trial_result(0, [], trial, {"epoch": 2, "val_top1": 0.5})
    runs.on_trial_complete(0, [], trial)
    assert len(runs.held) == 2  # nothing was lost, nothing was written
    away["now"] = False
    runs.on_trial_result(0, [], trial, {"epoch": 2, "val_top1": 0.5})  # Tune sees epoch 2 again after a resume
    assert runs.held == []
    run_id = runs.runs["t1"]
    assert [m.step for m in real.get_metric_history(run_id, "val_top1")] == [1, 2]
    finished = real.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["outcome"] == "completed"


def test_reconcile_ends_the_run_of_a_trial_the_budget_cut_before_its_first_report(tmp_path) -> None:
    """Such a trial has no result (no metrics, no config in Tune's Result) and Tune tells no callback of its end:
    reconcile finds it by Tune's trial and records it as cut, not left RUNNING."""
    from mlflow.tracking import MlflowClient

    from pipeline.trial_runs import TrialRuns

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("e")
    runs = TrialRuns(client, exp, client.create_run(exp).info.run_id, max_epochs=2)
    trial = SimpleNamespace(trial_id="t1", config={"lam": 1.0})
    runs.on_trial_start(0, [], trial)
    unreported = SimpleNamespace(metrics={}, config=None, metrics_dataframe=None, error=None)
    grid = type("Grid", (list,), {})([unreported])  # a ResultGrid: its results and the trials behind them
    grid._experiment_analysis = SimpleNamespace(trials=[trial])
    runs.reconcile(grid, cut={"t1"})
    run = client.get_run(runs.runs["t1"])
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "cut by the time budget after 0 epochs"
    assert run.data.params == {"lam": "1.0"}


def test_a_search_across_methods_draws_each_methods_own_hyperparameters_only() -> None:
    """Define-by-run: the method first, then only its names; a linear-probe trial never receives λ, and its
    Config keeps the base λ while its method is set."""
    import pickle

    from pipeline.searcher import MethodSpace

    p = load(None, ["tune.methods=[drtune, ce, linear_probe, l2sp, bss]"])
    define = pickle.loads(pickle.dumps(MethodSpace(p)))  # Ray saves the searcher's state
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True, n_startup_trials=5),
    )
    seen = {}
    for i in range(40):
        trial = study.ask()
        define(trial)
        method = trial.params["method"]
        names = {k.split(".", 1)[1] for k in trial.params if k != "method"}
        assert all(k.startswith(f"{method}.") for k in trial.params if k != "method")
        assert names == set(searched_names(p, method)), (method, names)
        seen[method] = trial.params
        study.tell(trial, float(i % 7) / 7)
    assert set(seen) == {"drtune", "ce", "linear_probe", "l2sp", "bss"}
    probe = trial_config(p, seen["linear_probe"])
    assert probe.train.method == "linear_probe" and probe.drtune.lam == p.drtune.lam
    assert probe.train.lr_head == seen["linear_probe"]["linear_probe.lr_head"]
    dr = trial_config(p, seen["drtune"])
    assert dr.drtune.lam == seen["drtune"]["drtune.lam"] and dr.drtune.queue_size in p.tune.queue_sizes
    points = starting_points(p)
    assert [pt["method"] for pt in points] == ["drtune", "ce", "linear_probe", "l2sp", "bss"]
    assert points[2] == {"method": "linear_probe", "linear_probe.lr_head": p.train.lr_head}
    assert search_space(p) == {}
    with pytest.raises(ConfigError, match="tune.methods"):
        load(None, ["tune.methods=[ce, ce]"])


def test_a_champion_that_no_longer_loads_is_compared_by_its_recorded_score_on_the_same_data(monkeypatch) -> None:
    """A champion pickled by an older release (its module moved) still gates promotion: by the test top-1
    it recorded on the same prepared data, and not at all when the data differ."""
    import mlflow

    from pipeline.champion import champion_score

    def old_model(uri):
        raise ModuleNotFoundError("No module named 'pipeline.serving'")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", old_model)
    version = SimpleNamespace(version=3, tags={"test_top1": "0.7962", "data_sha256": "abc"})
    client = SimpleNamespace(get_model_version_by_alias=lambda name, alias: version)
    assert champion_score(client, "m", None, [], "abc")[:2] == ("3", 0.7962)
    assert champion_score(client, "m", None, [], "abc")[3] is False  # it does not load
    kept, decision = decide(0.79, champion_score(client, "m", None, [], "abc")[1], "", champion_loads=False)
    assert not kept and "0.7962" in decision
    assert decide(0.7962, 0.7962, "", champion_loads=False)[0] and not decide(0.7962, 0.7962, "")[0]
    version_, score, note, loads = champion_score(client, "m", None, [], "other data")
    assert score is None and "not comparable" in note and not decide(0.9, score, note)[0]


def test_random_points_draw_only_the_methods_names_inside_their_ranges() -> None:
    """The Ray-free draw (bench/datascale.py's equal search) uses the same names and ranges as the search."""
    import random

    rng = random.Random(0)
    for method in ("linear_probe", "ce", "l2sp", "drtune"):
        p = load(None, [f"train.method={method}"])
        points = [random_point(p, rng) for _ in range(200)]
        assert all(sorted(pt) == sorted(searched_names(p)) for pt in points), method
        for name in searched_names(p):
            values = [pt[name] for pt in points]
            if name == "queue_size":
                assert set(values) == set(p.tune.queue_sizes)
            else:
                bounds = getattr(p.tune, name)
                assert bounds.low <= min(values) and max(values) <= bounds.high
                logs = sorted(math.log(v) for v in values)  # log-uniform: the median sits mid-range in log space
                assert abs(logs[100] - (math.log(bounds.low) + math.log(bounds.high)) / 2) < 0.15 * math.log(
                    bounds.high / bounds.low
                )


def test_a_search_stopped_before_all_its_trials_ended_is_not_taken_as_a_result() -> None:
    from types import SimpleNamespace

    def trial(done: bool = True, error: Exception | None = None) -> SimpleNamespace:
        return SimpleNamespace(metrics={"epoch": 1, "done": done}, error=error)

    require_finished([trial(), trial(), trial(), trial(False, RuntimeError())], 4, "unused")
    with pytest.raises(KeyboardInterrupt, match="search interrupted; resumes"):
        require_finished([trial(), trial(), trial(False, RuntimeError())], 4, "search interrupted; resumes")
    # Ctrl-C while the last trial ran: Tune counts it among the terminated, but it never finished
    with pytest.raises(KeyboardInterrupt):
        require_finished([trial(), trial(), trial(), SimpleNamespace(metrics={"trial_id": "t4"}, error=None)], 4, "cut")
    # a finished trial restored from a search state saved before Tune marked it done: its last epoch is the last
    require_finished([trial(), trial(), trial(), trial(False)], 4, "unused", epochs=1)
    with pytest.raises(KeyboardInterrupt):
        require_finished([trial(), trial(), trial(), trial(False)], 4, "cut", epochs=2)


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parent.parent / "bench").glob("*.py")))
def test_every_benchmark_script_imports(script, monkeypatch) -> None:
    """A benchmark that no longer imports after a refactor is found here, not the day someone needs it."""
    import importlib.util

    bench = Path(__file__).parent.parent / "bench"
    monkeypatch.syspath_prepend(str(bench))  # as `python bench/<script>` sees it
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", bench / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)


def test_a_retried_trial_that_completes_after_its_failure_is_learnt_by_optuna() -> None:
    """Told FAIL when it errored; when a rerun retries it and it finishes at val 0.8, the study gains a COMPLETE
    0.8 trial with the same parameters (Ray's own path drops that second completion)."""
    s = _searcher(max_epochs=4)
    config = s.suggest("t1")
    s.on_trial_complete("t1", None, error=True)
    s.on_trial_complete("t1", {"val_top1": 0.8, "epoch": 4})
    trials = s._ot_study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].value == 0.8 and trials[1].params == {"x": config["x"]}
    s.suggest("t2")
    s.on_trial_complete("t2", None, error=True)
    s.on_trial_complete("t2", {"val_top1": 0.5, "epoch": 2})  # retried, then stopped by ASHA: PRUNED
    assert [t.state.name for t in s._ot_study.get_trials(deepcopy=False)][-1] == "PRUNED"


def test_the_searcher_limits_the_trials_at_once_itself() -> None:
    s = _searcher()
    assert s.set_max_concurrency(1)
    assert s.suggest("t1") is not None and s.suggest("t2") is None  # one live trial: ask later
    s.on_trial_complete("t1", {"val_top1": 0.5, "epoch": 4})
    assert s.suggest("t2") is not None


def test_storage_uris_are_joined_on_their_path_keeping_their_query() -> None:
    from pipeline.cluster import join_uri

    custom = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(custom, "baseline") == "s3://bucket/runs/baseline?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri("s3://bucket/runs/", "search-1", "train") == "s3://bucket/runs/search-1/train"
    assert join_uri("/data/runs/", "baseline") == "/data/runs/baseline"


@pytest.mark.parametrize(
    "uri, reason",
    [
        ("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=htp", "Invalid S3 connection scheme 'htp'"),
        ("s3://bucket/runs?endpoint=127.0.0.1:9000", "Unexpected query parameter in S3 URI: 'endpoint'"),
        ("s3:///runs", "no bucket or host after s3://"),
        ("gs://", "no bucket or host after gs://"),
    ],
)
def test_a_malformed_storage_uri_is_refused_at_validation_with_pyarrows_reason(uri: str, reason: str) -> None:
    """Checked offline when the stage starts, not minutes later on a worker; good forms pass."""
    with pytest.raises(
        ConfigError, match=re.escape(f"ray.storage_path = {uri!r}: Value error, ") + ".*" + re.escape(reason)
    ):
        load(None, [f"ray.storage_path={uri}"])
    for good in ("s3://bucket/runs", "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http", "runs/ray"):
        assert load(None, [f"ray.storage_path={good}"]).ray.storage_path == good


def test_a_head_nobody_named_is_not_joined_and_a_private_ray_takes_this_process_cpus(monkeypatch) -> None:
    from pipeline import cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "_live_local_head", lambda: "10.0.0.1:6379")  # someone's `ray start` on this machine
    assert cluster.ray_address(load(None)) is None  # a private Ray, not someone else's cluster
    assert cluster.ray_address(load(None, ["ray.address=auto"])) == "10.0.0.1:6379"  # asked for: joined
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # inside `ray job submit`
    assert cluster.ray_address(load(None)) == "10.0.0.2:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(cluster, "_live_local_head", lambda: None)
    with pytest.raises(ConfigError, match="ray.address = auto: no Ray head runs on this machine"):
        cluster.ray_address(load(None, ["ray.address=auto"]))
    monkeypatch.setattr(cluster.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert cluster.private_cpus(load(None)) == 3 and cluster.private_cpus(load(None, ["ray.num_cpus=1"])) == 1


def test_credentials_inside_uris_are_redacted_and_warned_about() -> None:
    from pipeline.config import redact

    assert redact("s3://AKIA123:s3cr/et@bucket/runs/search-1") == "s3://***@bucket/runs/search-1"
    assert (
        redact("tracking https://user:token@mlflow.internal:5000 away")
        == "tracking https://***@mlflow.internal:5000 away"
    )
    assert (
        redact("s3://bucket/runs?endpoint_override=127.0.0.1:9000")
        == "s3://bucket/runs?endpoint_override=127.0.0.1:9000"
    )
    with pytest.warns(UserWarning, match=r"ray.storage_path holds credentials \(s3://\*\*\*@bucket/runs\)"):
        load(None, ["ray.storage_path=s3://KEY:SECRET@bucket/runs"])
    with pytest.raises(ConfigError) as refused:  # a refused value is shown redacted too
        load(None, ["ray.storage_path=s3://KEY:SECRET@bucket/runs?bogus=1"])
    assert "SECRET" not in str(refused.value) and "s3://***@bucket/runs?bogus=1" in str(refused.value)


def test_a_second_run_of_the_same_stored_search_is_refused_while_the_first_holds_it(tmp_path) -> None:
    from pipeline.experiment_state import search_lock

    with search_lock(str(tmp_path), "search-1"):
        with pytest.raises(ConfigError, match="another run is using the search stored at"):
            with search_lock(str(tmp_path), "search-1"):
                pass
        with search_lock(str(tmp_path), "search-2"):  # another search is another lock
            pass
    with search_lock(str(tmp_path), "search-1"):  # released when the first run ended
        pass


def test_tune_outputs_move_in_only_when_all_are_written_and_the_description_last(tmp_path, monkeypatch) -> None:
    """An error while writing leaves the previous outputs as they were and no scratch folder; a finished write
    replaces them, a stale leaderboard model included, with models/best.json moved after the model it describes."""
    from pipeline import tune_outputs
    from pipeline.tune_outputs import staged

    def write(root: Path, text: str, methods: tuple[str, ...]) -> None:
        for rel in ("models/best.safetensors", "models/best.json", "metrics/tune.json", "plots/landscape.png"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(f"{text} {rel}")
        for m in methods:
            (root / "models" / "leaderboard").mkdir(parents=True, exist_ok=True)
            (root / "models" / "leaderboard" / f"{m}.safetensors").write_text(f"{text} {m}")

    def files() -> dict[str, str]:
        return {str(p.relative_to(tmp_path)): p.read_text() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    write(tmp_path, "old", ("drtune", "l2sp"))
    before = files()
    with pytest.raises(OSError, match="disk full"), staged(tmp_path) as scratch:
        write(scratch, "new", ("drtune",))
        raise OSError("disk full")
    assert files() == before and [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == []

    moved = []
    monkeypatch.setattr(tune_outputs.os, "replace", lambda src, dst: (moved.append(str(dst)), os.rename(src, dst)))
    with staged(tmp_path) as scratch:
        write(scratch, "new", ("drtune",))
    assert files() == {k.replace("old", "new"): v.replace("old", "new") for k, v in before.items() if "l2sp" not in k}
    assert moved[-1] == str(tmp_path / "models" / "best.json") and len(moved) == 5


@pytest.mark.slow
def test_a_placement_group_left_reserved_with_no_worker_is_removed_and_a_used_one_kept(capsys) -> None:
    """A leaked Train placement group (CPUs reserved, no actor in it) is removed once idle for idle_s; a group
    whose worker lives and a group that reserves no CPU (Tune's trial drivers) are kept."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipeline import cluster
    from pipeline.placement_watch import PlacementGroupWatch

    @ray.remote(num_cpus=1)
    class Worker:
        def ping(self) -> int:
            return 1

    ray.init(address="local", num_cpus=3, resources={cluster.DRIVER_RESOURCE: 10}, include_dashboard=True)
    try:
        leaked, used = placement_group([{"CPU": 1}]), placement_group([{"CPU": 1}])
        driver = placement_group([{cluster.DRIVER_RESOURCE: 1}])
        ray.get([leaked.ready(), used.ready(), driver.ready()])
        worker = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used)).remote()
        assert ray.get(worker.ping.remote()) == 1
        now = [0.0]
        watch = PlacementGroupWatch(idle_s=60, every_s=10, clock=lambda: now[0])
        watch.on_step_begin(0, [])
        now[0] = 30.0
        assert watch.sweep(now[0]) == []  # idle, but not for long: a worker group may be starting in it
        now[0] = 61.0
        watch.on_step_begin(1, [])
        states = {pg_id: pg["state"] for pg_id, pg in placement_group_table().items()}
        assert states[leaked.id.hex()] == "REMOVED"
        assert states[used.id.hex()] == states[driver.id.hex()] == "CREATED" and not watch.disabled
        assert f"removed placement group {leaked.id.hex()}" in capsys.readouterr().out
        # its CPU is free again: a new 2-CPU reservation fits beside the used group
        assert ray.get(placement_group([{"CPU": 2}]).ready(), timeout=30)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_trials_sharing_a_gpu_run_four_at_a_quarter_each_and_never_five(tmp_path, monkeypatch) -> None:
    """Ray with one declared GPU (none real): at ray.gpus_per_worker 0.25 the search runs 4 trials at once,
    each trial's worker holding its quarter of GPU 0, and never a fifth. Each worker counts itself in on a gauge
    and holds its GPU share until four are in (or 30 s pass), so the peak does not depend on start-up timing."""
    import time

    import ray
    from ray import tune
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipeline import cluster, search
    from pipeline.training import worker_resources

    p = load(None, ["ray.gpus_per_worker=0.25", "ray.cpus_per_worker=1"])

    @ray.remote(num_cpus=0)
    class Gauge:
        def __init__(self) -> None:
            self.now, self.peak, self.gpus = 0, 0, []

        def enter(self, gpus: list) -> None:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.gpus.append(list(gpus))

        def leave(self) -> None:
            self.now -= 1

        def read(self) -> tuple[int, list]:
            return self.peak, self.gpus

    def trainable(config: dict) -> None:
        @ray.remote
        class Worker:  # stands in for a trial's Train worker: the same reservation
            def run(self) -> None:
                gauge = ray.get_actor("gauge")
                ray.get(gauge.enter.remote(ray.get_gpu_ids()))
                deadline = time.time() + 30
                while ray.get(gauge.read.remote())[0] < 4 and time.time() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)
                ray.get(gauge.leave.remote())

        # as Ray Train does: the worker's resources reserved in a placement group of their own, the worker in it
        group = placement_group([worker_resources(p)])
        ray.get(group.ready())
        strategy = PlacementGroupSchedulingStrategy(group)
        worker = Worker.options(
            num_cpus=worker_resources(p)["CPU"], num_gpus=worker_resources(p)["GPU"], scheduling_strategy=strategy
        ).remote()
        ray.get(worker.run.remote())
        ray.kill(worker)
        remove_placement_group(group)
        tune.report({"epoch": 1, "val_top1": 0.5})

    ray.init(address="local", num_cpus=8, num_gpus=1, resources={cluster.DRIVER_RESOURCE: 100})
    monkeypatch.setitem(cluster._private, "ray", True)
    try:
        assert cluster.trial_resources(p)[1] == 4  # 1 GPU / 0.25: the CPUs (8 / 1) allow more
        gauge = Gauge.options(name="gauge").remote()
        space = {"i": tune.grid_search(list(range(5)))}  # one more trial than fits
        results = search._tuner(p, trainable, str(tmp_path / "ray"), "shared-gpu", [], space).fit()
        assert not [r for r in results if r.error]
        peak, gpus = ray.get(gauge.read.remote())
    finally:
        ray.shutdown()
    assert peak == 4  # four at once, and no fifth ever beside them
    assert len(gpus) == 5 and all(g == [0] for g in gpus)  # each worker held a share of GPU 0
