"""Fault injection on the quick search: every fault is followed by the run a user would make next, and
the search must end where an uninterrupted one ends.

One project goes through the faults in turn (a search costs about a minute here, so they share it),
against an MLflow tracking server on 127.0.0.1 (:mod:`pipeline.faults` names the injection points):

1. ``held``: trial 1's final checkpoint is stored but its result never reaches Tune; Ctrl-C;
2. ``faulted``: the rerun, through ``dvc repro``; trial 2 loses its worker after epoch 1, the tracking
   server goes away during trial 2 and comes back, and trial 2's epoch-2 checkpoint hits a full disk on
   every try;
3. ``recovered``: the next ``dvc repro``, after the disk was freed;
4. ``damaged``: a cut searcher-state file, as a disk that filled while Tune saved it leaves;
5. ``fresh``: ``--fresh``, which discards the damaged search and runs it again uninterrupted: the
   reference every pick above is compared with;
6. ``registration``: register interrupted once the version exists, then once its decision is recorded
   but before ``@champion`` moves, then run to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_pipeline_e2e import BIN, _copy_project, _env, _free_port, _wait_for

pytestmark = pytest.mark.slow
EPOCHS = 3


class TrackingServer:
    """``mlflow server`` on a fixed port with a SQLite store in the project: stop it and start it again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.process = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
            ],
            cwd=self.root,
            env=dict(os.environ) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_for(f"{self.uri}/health")

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
            self.process = None


def _tune(root: Path, env: dict, *args: str, on_line=None, poll=None, dvc: bool = False) -> tuple[int, str]:
    """Run the tune stage (``dvc``: as ``dvc repro`` runs it, recorded in dvc.lock when it succeeds);
    ``on_line(line, process)`` sees each output line as it comes, ``poll(process)`` runs every half second."""
    process = subprocess.Popen(
        ["dvc", "repro", "--single-item", "tune"] if dvc else [sys.executable, "-m", "pipeline.tune", *args],
        cwd=root,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if poll is not None:

        def watch() -> None:
            while process.poll() is None:
                poll(process)
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line, process)
    process.wait(timeout=600)
    text = "".join(lines)
    (root / f"tune-{len(list(root.glob('tune-*.log')))}.log").write_text(text)  # for a person reading a failure
    return process.returncode, text


def _outputs(root: Path) -> dict:
    return {
        "tune": json.loads((root / "metrics" / "tune.json").read_text()),
        "best": json.loads((root / "models" / "best.json").read_text()),
    }


def _locked(root: Path) -> list[str]:
    """The stages dvc.lock records as done."""
    lock = root / "dvc.lock"
    return sorted(yaml.safe_load(lock.read_text())["stages"]) if lock.is_file() else []


def _trial_runs(uri: str, parent_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("drtune-digits").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return [(run, [int(m.step) for m in client.get_metric_history(run.info.run_id, "val_top1")]) for run in runs]


@pytest.fixture(scope="module")
def phases(tmp_path_factory) -> dict:
    root = _copy_project(
        tmp_path_factory.mktemp("faults") / "project",
        # no re-validation: its refits would double every phase's training (tested in test_pipeline_e2e)
        tune={"num_samples": 2, "early_stopping": False, "max_concurrent_trials": 1, "revalidate": "never"},
    )
    server = TrackingServer(root)
    server.start()
    markers = root / "fault-markers"
    markers.mkdir()
    env = _env(root) | {"MLFLOW_TRACKING_URI": server.uri, "DRTUNE_FAULT_DIR": str(markers)}
    out: dict = {"uri": server.uri}
    try:
        for stage in ("prepare", "tracking_store", "pretrain", "baseline"):  # what tune depends on
            done = subprocess.run(
                [sys.executable, "-m", f"pipeline.{stage}"],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-3000:]

        def interrupt_when_held(process) -> None:
            if (markers / "hold_final_report").exists() and "interrupt sent" not in out:
                out["interrupt sent"] = True
                time.sleep(1)  # the held process is asleep by now
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C

        started = time.time()
        code, text = _tune(root, env | {"DRTUNE_FAULT": "hold_final_report"}, poll=interrupt_when_held)
        if "interrupt sent" not in out:
            pytest.fail(f"the held report was never reached:\n{text[-3000:]}")
        out["held"] = {"code": code, "text": text, "seconds": time.time() - started}

        trials_seen: list[str] = []

        def outage(line: str, process) -> None:
            words = line.split()
            if line.startswith("trial ") and " epoch " in line and words[1] not in trials_seen:
                trials_seen.append(words[1])
            if line.startswith("trial ") and " epoch 1/" in line and len(trials_seen) == 2 and "outage" not in out:
                out["outage"] = True  # trial 2 has reported its first epoch: the tracking server goes away
                server.stop()
                threading.Timer(3.0, server.start).start()  # and is back a few seconds later

        started = time.time()
        code, text = _tune(root, env | {"DRTUNE_FAULT": "lose_worker@1,disk_full@2"}, on_line=outage, dvc=True)
        out["faulted"] = {
            "code": code,
            "text": text,
            "seconds": time.time() - started,
            "wrote_outputs": (root / "models" / "best.json").exists() or (root / "metrics" / "tune.json").exists(),
            "locked": _locked(root),
        }
        (markers / "disk_freed").touch()
        started = time.time()
        code, text = _tune(root, env, dvc=True)
        out["recovered"] = {
            "code": code,
            "text": text,
            "seconds": time.time() - started,
            "locked": _locked(root),
            **_outputs(root),
        }

        experiment = Path(out["recovered"]["best"]["experiment_path"])
        searcher = sorted(experiment.glob("searcher-state-*.pkl"))[-1]
        searcher.write_bytes(searcher.read_bytes()[:100])
        code, text = _tune(root, env)
        out["damaged"] = {"code": code, "text": text, "file": searcher.name}

        started = time.time()
        code, text = _tune(root, env, "--fresh")
        out["fresh"] = {"code": code, "text": text, "seconds": time.time() - started, **_outputs(root)}
        # Registration of the reference's winner, interrupted once the version exists, then once more after its
        # decision is recorded, just before the champion alias moves; then run to the end.
        from mlflow.tracking import MlflowClient

        def register(fault: str | None = None) -> subprocess.CompletedProcess:
            faulty = env | ({"DRTUNE_FAULT": fault} if fault else {})
            return subprocess.run(
                [sys.executable, "-m", "pipeline.register"],
                cwd=root,
                env=faulty,
                text=True,
                capture_output=True,
                timeout=300,
            )

        cut = register("interrupt_registration")
        before_alias = register("interrupt_before_alias")
        cut_version = MlflowClient(server.uri, registry_uri=server.uri).get_model_version("drtune-digits", "1")
        again = register()
        out["registration"] = {
            "before_alias": before_alias.returncode,
            "before_alias_tags": dict(cut_version.tags),
            "before_alias_description": cut_version.description,
            "before_alias_aliases": list(cut_version.aliases),
            "cut": cut.returncode,
            "cut_text": cut.stdout + cut.stderr,
            "code": again.returncode,
            "text": again.stdout + again.stderr,
        }
        out["markers"] = sorted(p.name for p in markers.iterdir())
        (root / "phase-seconds.json").write_text(
            json.dumps({k: v.get("seconds") for k, v in out.items() if isinstance(v, dict)})
        )
        yield out
    finally:
        server.stop()


def _pick(phase: dict) -> tuple:
    best = phase["best"]["best_config"]
    return tuple(sorted(best.items())), phase["tune"]["best_val_top1"]


def test_reference_search_runs_uninterrupted_after_fresh(phases) -> None:
    fresh = phases["fresh"]
    assert fresh["code"] == 0, fresh["text"][-3000:]
    assert "starting afresh: deleted the search stored at" in fresh["text"]
    assert fresh["tune"]["completed"] == 2 and fresh["tune"]["failed"] == 0
    runs = _trial_runs(phases["uri"], fresh["best"]["mlflow_parent_run_id"])
    assert len(runs) == 2  # the discarded search's runs are not under the new parent


def test_interrupt_between_the_train_checkpoint_and_tunes_record_loses_no_trial(phases) -> None:
    held, faulted = phases["held"], phases["faulted"]
    assert held["code"] == 130 and "run it again to resume" in held["text"]
    assert "resuming the search stored at" in faulted["text"]
    # trial 1 was restored at its stored final checkpoint: it reports that epoch and completes, without
    # training any epoch again (retrained from scratch, it would report epochs 1 and 2 once more)
    first = faulted["text"].split("trial ")[1].split()[0]
    assert f"trial {first} completed after {EPOCHS} epochs" in faulted["text"]
    assert f"trial {first} epoch {EPOCHS}/{EPOCHS}" in faulted["text"]
    assert not [e for e in range(1, EPOCHS) if f"trial {first} epoch {e}/{EPOCHS}" in faulted["text"]]


def test_a_full_disk_fails_the_trial_and_the_partial_search_fails_the_stage_writing_nothing(phases) -> None:
    """A trial that failed with an error makes the search partial: the stage exits non-zero and writes no
    outputs, so DVC does not record it as done and the next ``dvc repro`` retries the trial (``recovered``)."""
    faulted = phases["faulted"]
    assert faulted["code"] != 0 and "ERROR: failed to reproduce 'tune'" in faulted["text"], faulted["text"][-3000:]
    assert "tune" not in faulted["locked"]  # DVC did not record the partial search as done
    assert "1 of 2 trials failed with an error" in faulted["text"] and "run the stage again" in faulted["text"]
    assert not faulted["wrote_outputs"]
    assert "does not answer" in faulted["text"] and "answers again" in faulted["text"]
    # the lost worker did not just kill trial 2: its worker was killed after epoch 1, and the trial still
    # reached epoch 2's checkpoint (where the full disk failed it), so Ray Train restarted its workers
    assert "lose_worker" in phases["markers"] and "No space left on device" in faulted["text"]


def test_a_rerun_retries_failed_trials_and_picks_what_an_uninterrupted_search_picks(phases) -> None:
    recovered, fresh = phases["recovered"], phases["fresh"]
    assert recovered["code"] == 0, recovered["text"][-3000:]
    assert "continued from its epoch-1 checkpoint" in recovered["text"]
    assert recovered["tune"]["completed"] == 2 and recovered["tune"]["failed"] == 0
    assert "tune" in recovered["locked"]  # the second `dvc repro` recorded the stage as done
    assert _pick(recovered) == _pick(fresh)


def test_every_trial_run_has_each_epoch_once_and_none_is_left_running(phases) -> None:
    recovered = phases["recovered"]
    runs = _trial_runs(phases["uri"], recovered["best"]["mlflow_parent_run_id"])
    assert len(runs) == 2
    for run, steps in runs:
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.info.run_name, steps)
        assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed"
    assert max(int(run.data.tags.get("attempts", "1")) for run, _ in runs) >= 2  # the restarts show


def test_an_interrupted_registration_is_finished_by_the_rerun_not_registered_twice(phases) -> None:
    from mlflow.tracking import MlflowClient

    reg = phases["registration"]
    assert reg["cut"] == 130 and reg["code"] == 0, reg["cut_text"][-2000:] + reg["text"][-2000:]
    # cut before the alias moved: the version already says what was decided, and is no champion yet
    assert reg["before_alias"] == 130 and reg["before_alias_aliases"] == ["challenger"]
    assert "promoted" in reg["before_alias_tags"]["decision"] and reg["before_alias_description"]
    client = MlflowClient(phases["uri"], registry_uri=phases["uri"])
    versions = client.search_model_versions("name = 'drtune-digits'")
    assert [str(v.version) for v in versions] == ["1"]
    champion = client.get_model_version_by_alias("drtune-digits", "champion")
    assert str(champion.version) == "1" and "test_top1" in champion.tags and champion.description
    parent = client.get_run(phases["fresh"]["best"]["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["registered_version"] == "1"


def test_a_damaged_search_state_is_named_with_the_command_that_starts_afresh(phases) -> None:
    damaged = phases["damaged"]
    assert damaged["code"] == 2
    assert f"{damaged['file']} cannot be read" in damaged["text"] and "--fresh" in damaged["text"]
    assert "Traceback" not in damaged["text"]
