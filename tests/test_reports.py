"""Reports researchers read (plots, history.csv, TensorBoard image grids, the summary table) and runs of
several classes on several devices (``--gpu 0 --gpu 1``), whose scheduling is tested on the CPU with two
worker processes (``GLASS_CPU_WORKERS=2``)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import glass
import main
import utils
from conftest import ROOT, TINY_NET, copy_class_subset, run_main, tiny_dataset_args

CLASS_DIR = Path("models") / "backbone_0"
METRICS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro"]


def read_csv(path: Path) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_summary_matches_results(results: Path) -> None:
    """summary.csv and summary.md hold the numbers of results.csv, in percent with two decimals."""
    expected = read_csv(results / "results.csv")
    summary = read_csv(results / "summary.csv")
    assert [row["class"] for row in summary] == [row["Row Names"] for row in expected]
    markdown = (results / "summary.md").read_text().splitlines()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown if line.startswith("| ")]
    assert table[0] == ["class", *METRICS, "best_epoch"]
    assert [row[0] for row in table[1:]] == [row["Row Names"] for row in expected]
    for want, got, md in zip(expected, summary, table[1:]):
        for i, key in enumerate(METRICS, start=1):
            if want[key] == "":
                assert got[key] == "" and md[i] == "n/a"
            else:
                assert float(got[key]) == pytest.approx(float(want[key]) * 100, abs=0.005)
                assert md[i] == got[key]
        if want["Row Names"] != "Mean":
            assert int(got["best_epoch"]) == int(float(want["best_epoch"])) == int(md[-1])


# --------------------------------------------------------------------------------------------------
# One class: the reports of the tiny training run shared with test_end_to_end.py

def test_plots_are_valid_images(trained_tire):
    folder = trained_tire / "plots" / "mvtec_tire"
    assert sorted(p.name for p in folder.iterdir()) == sorted(utils.PLOT_NAMES)
    for name in utils.PLOT_NAMES:
        image = cv2.imread(str(folder / name))
        assert image is not None, name
        height, width, channels = image.shape
        assert channels == 3 and 300 <= height <= 2000 and 400 <= width <= 2500, (name, image.shape)
        assert image.std() > 10, f"{name} is (nearly) blank"


def test_eval_heatmaps_colour_each_map_on_the_fixed_scale_of_the_scores(tmp_path):
    """The third panel is jet(255 x score), as in the reference's current version: a map of 0.2 everywhere has
    the same colour whatever the other test images score (a min-max scale over the test set made it 0)."""
    images = np.zeros((2, 3, 32, 32), np.float32)
    maps = np.stack([np.full((32, 32), 0.2, np.float32), np.full((32, 32), 0.8, np.float32)])
    glass.GLASS._write_heatmaps(SimpleNamespace(results_path=str(tmp_path)), images, maps,
                                np.zeros((2, 1, 32, 32), np.float32), "mvtec_x", "eval")
    for index, level in ((1, 51), (2, 204)):
        panel = cv2.imread(str(tmp_path / "eval" / "mvtec_x" / f"{index:03d}.png"))
        assert panel.shape == (256, 768, 3)
        colour = cv2.applyColorMap(np.full((1, 1), level, np.uint8), cv2.COLORMAP_JET)[0, 0]
        assert (panel[:, 522:758] == colour).all()  # the map's panel, away from its blended left edge


def test_history_has_one_row_per_epoch_matching_tensorboard(trained_tire):
    class_dir = trained_tire / CLASS_DIR / "mvtec_tire"
    rows = read_csv(class_dir / utils.HISTORY_NAME)
    assert list(rows[0]) == list(utils.HISTORY_COLUMNS)
    assert [int(row["epoch"]) for row in rows] == [0, 1]  # --meta_epochs 2 of the tiny profile
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps) and steps[0] >= 1
    for row in rows:
        assert math.isfinite(float(row["loss"])) and 0.0 <= float(row["p_true"]) <= 1.0 and 0.0 <= float(row["p_fake"]) <= 1.0
    tb = EventAccumulator(str(class_dir / "tb")).Reload()
    iauroc = {event.step: event.value for event in tb.Scalars("i-auroc")}
    pauroc = {event.step: event.value for event in tb.Scalars("p-auroc")}
    for row in rows:
        assert float(row["image_auroc"]) == pytest.approx(iauroc[int(row["epoch"])], abs=1e-6)
        assert float(row["pixel_auroc"]) == pytest.approx(pauroc[int(row["epoch"])], abs=1e-6)


def test_tensorboard_holds_image_grids_beside_the_scalars(trained_tire):
    tb = EventAccumulator(str(trained_tire / CLASS_DIR / "mvtec_tire" / "tb"), size_guidance={"images": 0}).Reload()
    tags = tb.Tags()
    assert {utils.TB_SAMPLES_TAG, utils.TB_LAS_TAG} <= set(tags["images"])
    assert {"loss", "p_true", "p_fake", "i-auroc", "p-auroc"} <= set(tags["scalars"])
    samples = tb.Images(utils.TB_SAMPLES_TAG)
    las = tb.Images(utils.TB_LAS_TAG)
    assert sorted({event.step for event in samples}) == [0, 1]  # one grid per evaluation
    # one grid per epoch, at the global step of its first batch (the training scalars' x axis)
    history = read_csv(trained_tire / CLASS_DIR / "mvtec_tire" / utils.HISTORY_NAME)
    assert sorted(event.step for event in las) == [0] + [int(row["step"]) for row in history[:-1]]
    for event, columns in ((samples[-1], 3), (las[-1], 3)):  # image | ground truth | map; image | LAS | mask
        grid = cv2.imdecode(np.frombuffer(event.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
        assert grid is not None and grid.shape[:2] == (event.height, event.width)
        assert grid.shape[1] == columns * utils.GRID_TILE + (columns - 1) * 2
        assert grid.shape[0] >= utils.GRID_TILE and grid.std() > 5


def test_summary_has_the_numbers_of_results_csv(trained_tire):
    assert_summary_matches_results(trained_tire)


# --------------------------------------------------------------------------------------------------
# Two classes: one after another, then in two worker processes on the CPU

TWO_NET = [*TINY_NET, "--meta_epochs", "1", "--limit", "4", "--step", "1", "--cache", "off"]


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory, tire_root) -> Path:
    """Two small classes that give different numbers: `tire` and a smaller `tire2`."""
    root = tmp_path_factory.mktemp("two_classes")
    copy_class_subset(tire_root / "tire", root / "tire", n_train=4, n_good=2, n_per_defect=1)
    copy_class_subset(tire_root / "tire", root / "tire2", n_train=3, n_good=1, n_per_defect=1)
    return root


def two_class_args(results: Path, data: Path, dtd: Path) -> list:
    return ["--results_path", results, "--gpu", "0", "--gpu", "1", *TWO_NET,
            *tiny_dataset_args(data, dtd, classes=("tire", "tire2"))]


def captured_run(args, cpu_workers: str | None) -> tuple:
    """``main.cli(args)`` with CUDA hidden; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        if cpu_workers is None:
            patch.delenv(main.CPU_WORKERS_ENV, raising=False)
        else:
            patch.setenv(main.CPU_WORKERS_ENV, cpu_workers)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sequential_and_parallel(tmp_path_factory, two_classes, dtd_root) -> dict:
    """The same two-class run without CUDA: plain (one class at a time) and with two CPU worker processes."""
    runs = {}
    for kind, workers in (("sequential", None), ("parallel", "2")):
        results = tmp_path_factory.mktemp(kind)
        code, out, err = captured_run(two_class_args(results, two_classes, dtd_root), workers)
        runs[kind] = {"results": results, "code": code, "out": out, "err": err}
    return runs


def test_several_gpus_without_cuda_run_one_class_at_a_time(sequential_and_parallel):
    run = sequential_and_parallel["sequential"]
    assert run["code"] == 0, run["err"][-2000:]
    assert "no CUDA device: running on CPU, one class at a time" in run["err"]
    assert not (run["results"] / main.WORKERS_FOLDER).exists()
    record = json.loads((run["results"] / "run.json").read_text())
    assert record["status"] == "finished" and record["device"] == "cpu" and "workers" not in record
    assert [row["Row Names"] for row in read_csv(run["results"] / "results.csv")] == ["mvtec_tire", "mvtec_tire2", "Mean"]


def test_two_cpu_workers_give_the_sequential_results_table(sequential_and_parallel):
    sequential, parallel = sequential_and_parallel["sequential"], sequential_and_parallel["parallel"]
    assert parallel["code"] == 0, parallel["err"][-2000:]
    assert "no CUDA device: 2 worker processes on the CPU" in parallel["err"]
    want = read_csv(sequential["results"] / "results.csv")
    got = read_csv(parallel["results"] / "results.csv")
    assert want[0] != want[1]  # the two classes differ, so a mix-up of rows would show
    assert got == want  # same rows, same numbers, same order
    for kind in ("sequential", "parallel"):
        assert_summary_matches_results(sequential_and_parallel[kind]["results"])
        assert (sequential_and_parallel[kind]["results"] / "summary.md").read_text() == \
            (sequential["results"] / "summary.md").read_text()
    # every class has its own checkpoints and plots, written by its worker
    for name in ("mvtec_tire", "mvtec_tire2"):
        assert list((parallel["results"] / CLASS_DIR / name).glob("ckpt_best_*.pth"))
        assert (parallel["results"] / "plots" / name / "roc.png").is_file()


def test_two_cpu_workers_ran_at_the_same_time_and_are_recorded(sequential_and_parallel):
    parallel = sequential_and_parallel["parallel"]
    record = json.loads((parallel["results"] / "run.json").read_text())
    assert record["status"] == "finished" and record["devices"] == ["cpu"]
    workers = record["workers"]
    assert sorted(workers) == ["mvtec_tire", "mvtec_tire2"]
    pids = {info["pid"] for info in workers.values()}
    assert len(pids) == 2
    for info in workers.values():
        assert info["device"] == "cpu" and info["exit_code"] == 0 and Path(info["log"]).is_file()
    spans = [(datetime.fromisoformat(w["started"]), datetime.fromisoformat(w["finished"])) for w in workers.values()]
    assert max(start for start, _ in spans) < min(end for _, end in spans), "the two workers did not overlap"
    assert set(record["results"]) == {"mvtec_tire", "mvtec_tire2"}
    # each worker trained its own class on the CPU
    for name, info in workers.items():
        log = Path(info["log"]).read_text()
        assert f"Selecting dataset [{name}] (1/1)" in log and "Device: cpu" in log
    assert not list((parallel["results"] / main.WORKERS_FOLDER).glob("*.json"))  # merged, then removed


def test_workers_checking_the_results_folder_at_once_do_not_trip_each_other(tmp_path):
    """Every worker of a parallel run checks that the results folder is writable as it starts; with one
    shared probe file one worker removed it under another (a CI failure: "No such file or directory")."""
    errors = []

    def check_many() -> None:
        for _ in range(300):
            try:
                main.ensure_writable(str(tmp_path))
            except utils.GlassError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=check_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list(tmp_path.iterdir()) == []  # no probe left behind


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_the_markdown_summary_is_printed_at_the_end(sequential_and_parallel, kind):
    run = sequential_and_parallel[kind]
    table = [line for line in (run["results"] / "summary.md").read_text().splitlines() if line.startswith("|")]
    printed = run["out"].splitlines()
    start = printed.index(table[0])
    assert printed[start:start + len(table)] == table
    assert printed[start + len(table)].startswith("Results: ")


def test_an_error_in_a_worker_is_one_line_and_keeps_the_other_class(sequential_and_parallel, two_classes, dtd_root,
                                                                       tmp_path):
    """tire2's folder holds a model of other options: its worker fails as the plain run would; tire's row stays."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(sequential_and_parallel["parallel"]["results"] / "models", results / "models")
    config_path = results / CLASS_DIR / "mvtec_tire2" / "config.json"
    config = json.loads(config_path.read_text())
    config["net"]["dsc_hidden"] = 64
    config_path.write_text(json.dumps(config))

    code, out, err = captured_run(two_class_args(results, two_classes, dtd_root), "2")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "holds a model trained with other options (dsc_hidden: 64 -> 128)" in errors[0]
    assert "mvtec_tire2" in errors[0] and "Traceback" not in err
    rows = read_csv(results / "results.csv")
    want = read_csv(sequential_and_parallel["sequential"]["results"] / "results.csv")
    assert [row["Row Names"] for row in rows] == ["mvtec_tire", "Mean"]
    assert rows[0] == want[0]  # the finished class is tested again and kept
    record = json.loads((results / "run.json").read_text())
    assert record["status"].startswith("failed: ") and record["workers"]["mvtec_tire2"]["exit_code"] == 2
    assert record["workers"]["mvtec_tire"]["exit_code"] == 0


def test_a_parallel_rerun_prints_what_its_workers_say(sequential_and_parallel, two_classes, dtd_root, tmp_path, caplog):
    """Notes and warnings of the workers reach the console (as the plain run prints them), not only their logs."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(sequential_and_parallel["parallel"]["results"] / "models", results / "models")
    caplog.set_level("WARNING")
    args = ["--results_path", results, "--gpu", "0", "--gpu", "1", *TWO_NET,
            *tiny_dataset_args(two_classes, dtd_root, classes=("tire", "tire2"), extra=("--resize", "72"))]
    code, out, err = captured_run(args, "2")
    assert code == 0, err[-2000:]
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    for name in ("mvtec_tire", "mvtec_tire2"):
        assert f"{name}: already trained (1 epoch), testing its best checkpoint" in out
        assert any(message.startswith(f"{name} (worker): Testing {name} on images prepared otherwise than at its "
                                      "training (dataset.resize") for message in warnings), warnings


def test_a_killed_parallel_run_resumes_every_class_where_it_stopped(two_classes, dtd_root, tmp_path, monkeypatch):
    """Both workers are killed in their second epoch; the same command again resumes each class from its
    own ckpt.pth and ends as an uninterrupted parallel run."""
    import glass
    from test_resume import assert_same_checkpoint

    def arguments(results: Path) -> list:
        return ["--results_path", results, "--gpu", "0", "--gpu", "1", *TWO_NET, "--meta_epochs", "2",
                *tiny_dataset_args(two_classes, dtd_root, classes=("tire", "tire2"))]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    code, _, err = captured_run(arguments(whole), "2")
    assert code == 0, err[-2000:]

    monkeypatch.setenv(glass.KILL_HOOK_ENV, "1:0")  # inherited by the workers: SIGKILL before epoch 1's step
    code, _, err = captured_run(arguments(resumed), "2")
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "its worker process on cpu was killed by SIGKILL (out of memory, or stopped from outside); the same " \
           "command resumes it from its ckpt.pth" in errors[0]
    for name in ("mvtec_tire", "mvtec_tire2"):
        assert torch.load(resumed / CLASS_DIR / name / "ckpt.pth", weights_only=True)["epoch"] == 0
    assert not (resumed / "results.csv").exists()
    assert json.loads((resumed / "run.json").read_text())["status"].startswith("failed: ")

    monkeypatch.delenv(glass.KILL_HOOK_ENV)
    code, _, err = captured_run(arguments(resumed), "2")
    assert code == 0, err[-2000:]
    record = json.loads((resumed / "run.json").read_text())
    assert sorted(record["workers"]) == ["mvtec_tire", "mvtec_tire2"]
    for name, info in record["workers"].items():
        assert info["exit_code"] == 0
        log = Path(info["log"]).read_text()
        # The killed run's part of the log is kept, and this run's part follows it.
        killed, header, resumed_part = log.rpartition(f": {name} on cpu ====\n")
        assert killed.count(f": {name} on cpu ====") == 1 and "resuming from" not in killed
        assert "resuming from" in resumed_part and "(1 of 2 epochs done)" in resumed_part
    assert read_csv(resumed / "results.csv") == read_csv(whole / "results.csv")
    for name in ("mvtec_tire", "mvtec_tire2"):
        best = sorted(p.name for p in (whole / CLASS_DIR / name).glob("ckpt_best_*.pth"))
        assert sorted(p.name for p in (resumed / CLASS_DIR / name).glob("ckpt_best_*.pth")) == best and len(best) == 1
        for checkpoint in ("ckpt.pth", *best):
            assert_same_checkpoint(resumed / CLASS_DIR / name / checkpoint, whole / CLASS_DIR / name / checkpoint)


def test_a_terminated_parallel_run_records_how_its_workers_ended(two_classes, dtd_root, tmp_path):
    import os
    import signal

    results = tmp_path / "results"
    env = {**os.environ, main.CPU_WORKERS_ENV: "2", "CUDA_VISIBLE_DEVICES": ""}
    parent = subprocess.Popen([sys.executable, main.__file__, *map(str, two_class_args(results, two_classes, dtd_root))],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    workers: dict = {}
    while len(workers) < 2 and parent.poll() is None and time.time() < deadline:
        time.sleep(0.1)
        try:
            workers = json.loads((results / "run.json").read_text()).get("workers", {})
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    assert len(workers) == 2, "the workers did not start"
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 128 + signal.SIGTERM, err[-2000:]
    record = json.loads((results / "run.json").read_text())
    assert record["status"] == "interrupted"
    for name, info in record["workers"].items():
        assert info["exit_code"] not in (None, 0) and info["finished"] is not None, (name, info)
        assert _gone(info["pid"])


# --------------------------------------------------------------------------------------------------
# The scheduler and the device plan, without training

class FakeProcesses:
    """``start`` for :func:`main.run_scheduled`: a Python process that sleeps (or exits with a code)."""

    def __init__(self, plan: dict):
        self.plan = plan  # task -> (seconds, exit code)
        self.events = []  # (time, "start"/"end", task, device)

    def start(self, task, device):
        seconds, code = self.plan[task]
        self.events.append((time.monotonic(), "start", task, device))
        return subprocess.Popen([sys.executable, "-c", f"import sys, time; time.sleep({seconds}); sys.exit({code})"])

    def finished(self, task, device, code):
        self.events.append((time.monotonic(), "end", task, device))
        return RuntimeError(f"task {task} failed") if code else None


def test_scheduler_runs_every_task_at_most_one_per_device():
    fake = FakeProcesses({task: (0.3, 0) for task in range(5)})
    main.run_scheduled(range(5), ["gpu0", "gpu1"], fake.start, fake.finished, poll_seconds=0.05)
    starts = [e for e in fake.events if e[1] == "start"]
    ends = [e for e in fake.events if e[1] == "end"]
    assert [task for _, _, task, _ in starts] == [0, 1, 2, 3, 4] and sorted(task for _, _, task, _ in ends) == [0, 1, 2, 3, 4]
    busy, most = {}, 0
    for _, what, task, device in sorted(fake.events, key=lambda e: (e[0], e[1] == "start")):
        if what == "start":
            assert device not in busy, f"{device} got task {task} while running task {busy.get(device)}"
            busy[device] = task
        else:
            assert busy.pop(device) == task
        most = max(most, len(busy))
    assert most == 2  # both devices were used at once


def test_scheduler_stops_starting_after_a_failure_and_waits_for_the_running_task():
    fake = FakeProcesses({0: (0.8, 0), 1: (0.0, 3), 2: (0.0, 0), 3: (0.0, 0)})
    with pytest.raises(RuntimeError, match="task 1 failed"):
        main.run_scheduled(range(4), ["a", "b"], fake.start, fake.finished, poll_seconds=0.05)
    assert [task for _, what, task, _ in fake.events if what == "start"] == [0, 1]
    assert sorted(task for _, what, task, _ in fake.events if what == "end") == [0, 1]  # task 0 finished, kept


def test_scheduler_terminates_running_tasks_when_interrupted():
    processes, told = [], []

    def start(task, device):
        seconds = 0.0 if task == 0 else 60
        processes.append(subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"]))
        return processes[-1]

    def finished(task, device, code):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        main.run_scheduled([0, 1], ["a", "b"], start, finished, poll_seconds=0.05,
                           terminated=lambda task, device, code: told.append((task, device, code)))
    # Task 1 would sleep for a minute and exit 0 (the scheduler waits for it at worst): a non-zero code means it was
    # terminated.
    assert processes[1].returncode is not None and processes[1].returncode != 0
    # Task 0 ended by itself, but the interruption came while its results were taken: its exit code is told too.
    assert sorted(told) == [(0, "a", 0), (1, "b", processes[1].returncode)]


def test_a_termination_while_a_task_starts_still_stops_and_reports_it():
    import os
    import signal

    processes, told = [], []

    def start(task, device):
        processes.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        os.kill(os.getpid(), signal.SIGTERM)  # after the process started, before the scheduler holds it
        time.sleep(0.05)
        return processes[-1]

    with pytest.raises(utils.Terminated), utils.termination_as_interrupt():
        main.run_scheduled([0, 1], ["a", "b"], start, lambda *_: None, poll_seconds=0.05,
                           terminated=lambda task, device, code: told.append((task, device, code)))
    assert len(processes) == 1 and processes[0].returncode == -signal.SIGTERM
    assert told == [(0, "a", -signal.SIGTERM)]


def test_a_termination_while_results_are_taken_lets_them_be_taken_whole():
    import os
    import signal

    processes, taken, told = [], [], []

    def start(task, device):
        seconds = 0.0 if task == 0 else 60
        processes.append(subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"]))
        return processes[-1]

    def finished(task, device, code):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        taken.append((task, code))  # the rest of the results, after the signal came

    with pytest.raises(utils.Terminated), utils.termination_as_interrupt():
        main.run_scheduled([0, 1], ["a", "b"], start, finished, poll_seconds=0.05,
                           terminated=lambda task, device, code: told.append((task, device, code)))
    assert taken == [(0, 0)] and told == [(1, "b", -signal.SIGTERM)] and processes[1].returncode == -signal.SIGTERM


def test_interruptions_deferred_raises_them_on_leaving():
    import os
    import signal

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with utils.interruptions_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            steps.append("after the signal")
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_device_plan(monkeypatch, capsys):
    monkeypatch.delenv(main.CPU_WORKERS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main.plan_workers([0], ["a", "b"]) == []
    assert main.plan_workers([0, 1], ["a"]) == []
    assert main.plan_workers([0, 0], ["a", "b"]) == []
    assert capsys.readouterr().err == ""
    assert main.plan_workers([0, 1], ["a", "b"]) == []
    assert capsys.readouterr().err.strip() == "no CUDA device: running on CPU, one class at a time"
    monkeypatch.setenv(main.CPU_WORKERS_ENV, "2")
    assert main.plan_workers([0, 1, 2], ["a", "b", "c"]) == [-1, -1]
    monkeypatch.setenv(main.CPU_WORKERS_ENV, "two")
    with pytest.raises(utils.GlassError):
        main.plan_workers([0, 1], ["a", "b"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert main.plan_workers([2, -1, 0, 2, 3], ["a", "b"]) == [2, 0]
    assert main.plan_workers([0, 1, 2], ["a", "b", "c", "d"]) == [0, 1, 2]
    with pytest.raises(utils.GlassError, match="--gpu 5 is not present"):
        main.plan_workers([0, 5], ["a", "b"])


def test_last_error_line_reads_what_cli_prints(tmp_path):
    log = tmp_path / "w.log"
    log.write_text("INFO something\nprogress 50%\rError: the real problem: fix it\nTry 'main.py --help' for help.\n")
    assert main.last_error_line(str(log)) == "the real problem: fix it"
    log.write_text("Traceback (most recent call last):\nValueError: boom\n")
    assert main.last_error_line(str(log)) is None
    log.write_text("Error: first\nsomething\nError: second\n")
    assert main.last_error_line(str(log)) == "second"  # the last of several
    earlier = "Error: an earlier run's problem\n==== 2026-01-01T00:00:00: mvtec_tire on cpu ====\n"
    log.write_text(earlier + "ValueError: boom\n")
    assert main.last_error_line(str(log)) == "an earlier run's problem"
    assert main.last_error_line(str(log), offset=len(earlier)) is None  # only this run's part of the log counts


def test_results_csv_keeps_the_rows_of_classes_tested_by_earlier_runs(tmp_path, tiny_tire, dtd_root):
    import shutil

    from conftest import TINY_NET, run_main, tiny_dataset_args

    data = tmp_path / "data"
    shutil.copytree(tiny_tire / "tire", data / "tire")
    shutil.copytree(tiny_tire / "tire", data / "tire2")
    net = [*TINY_NET[:TINY_NET.index("--meta_epochs")], "--meta_epochs", "1", "--step", "2", "--limit", "8"]
    results = tmp_path / "results"

    def table():
        with open(results / "results.csv", newline="") as handle:
            return {row["Row Names"]: row for row in csv.DictReader(handle)}

    assert run_main(["--results_path", results, *net, *tiny_dataset_args(data, dtd_root, classes=("tire",))]) == 0
    first = table()
    assert run_main(["--results_path", results, *net, *tiny_dataset_args(data, dtd_root, classes=("tire2",))]) == 0
    both = table()
    assert list(both) == ["mvtec_tire", "mvtec_tire2", "Mean"] and both["mvtec_tire"] == first["mvtec_tire"]
    mean = (float(both["mvtec_tire"]["image_auroc"]) + float(both["mvtec_tire2"]["image_auroc"])) / 2
    assert float(both["Mean"]["image_auroc"]) == pytest.approx(mean)
    assert both["mvtec_tire"]["best_epoch"] == "0"
    # A test-only run of one class rewrites its row and keeps the other one.
    assert run_main(["--results_path", results, "--test", "test", *net,
                     *tiny_dataset_args(data, dtd_root, classes=("tire",))]) == 0
    assert table() == both
    # Blank lines (an editor's trailing newline, say) are not damage: every row is kept.
    with open(results / "results.csv", "a", newline="") as handle:
        handle.write("\r\n,,\r\n")
    assert run_main(["--results_path", results, "--test", "test", *net,
                     *tiny_dataset_args(data, dtd_root, classes=("tire",))]) == 0
    assert table() == both and not (results / "results.csv.old").exists()
    # A results.csv that cannot be read is kept as results.csv.old, and a new table is started; a second one
    # does not overwrite that copy.
    for damage, kept in [("not,the,columns\n", "results.csv.old"), ("still,not,them\n", "results.csv.old.1")]:
        (results / "results.csv").write_text(damage)
        assert run_main(["--results_path", results, "--test", "test", *net,
                         *tiny_dataset_args(data, dtd_root, classes=("tire",))]) == 0
        assert (results / kept).read_text() == damage
        assert list(table()) == ["mvtec_tire", "Mean"]
    assert (results / "results.csv.old").read_text() == "not,the,columns\n"


def _gone(pid: int) -> bool:
    """The process has ended (no such process, or a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_process_ends_when_its_parent_is_killed():
    # A parallel run's workers start with utils.die_with_parent: a SIGKILLed parent leaves no orphan training.
    script = ("import subprocess, sys, time; sys.path.insert(0, sys.argv[1]); import utils; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
              "preexec_fn=utils.die_with_parent); print(child.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(Path(main.__file__).parent)], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    assert not _gone(child)
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while not _gone(child) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(child)


def test_results_csv_mean_row_is_the_mean_of_the_available_values(tmp_path):
    means = utils.compute_and_store_final_results(str(tmp_path), [[0.1, 0.5], [0.2, float("nan")], [0.9, 1.0]],
                                                  ["image_auroc", "pixel_auroc"], ["a", "b", "c"])
    assert means == {"mean_image_auroc": pytest.approx(0.4), "mean_pixel_auroc": pytest.approx(0.75)}  # not the median
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["Row Names", "image_auroc", "pixel_auroc"]
    assert rows[2] == ["b", "0.2", ""]  # not available: an empty cell, left out of the mean
    assert rows[-1][0] == "Mean" and float(rows[-1][1]) == pytest.approx(0.4) and float(rows[-1][2]) == pytest.approx(0.75)


def test_device_labels_and_a_zero_cpu_worker_count(monkeypatch):
    assert main.device_label(-1) == "cpu" and main.device_label(0) == "cuda:0" and main.device_label(3) == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(main.CPU_WORKERS_ENV, "0")
    with pytest.raises(utils.GlassError, match="GLASS_CPU_WORKERS=0 is not a number of worker processes"):
        main.plan_workers([0, 1], ["a", "b"])


@pytest.fixture
def fixed_clock(monkeypatch):
    class Fixed(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(main, "datetime", Fixed)


def test_run_records_started_in_the_same_second_do_not_overwrite_each_other(tmp_path, fixed_clock):
    first = main.RunRecord(str(tmp_path), {"seed": 0}, {}, torch.device("cpu"))
    second = main.RunRecord(str(tmp_path), {"seed": 1}, {}, torch.device("cpu"))
    assert first.path != second.path
    assert sorted(p.name for p in tmp_path.glob("run_*.json")) == ["run_20260102-030405-2.json",
                                                                    "run_20260102-030405.json"]
    assert json.loads(Path(first.path).read_text())["options"]["main"]["seed"] == 0


def test_run_record_writes_unavailable_metrics_as_null(tmp_path, fixed_clock):
    record = main.RunRecord(str(tmp_path), {}, {}, torch.device("cpu"))
    record.add_result("mvtec_tire", [0.75, 0.5, float("nan"), float("nan"), float("nan"), 2])
    text = (tmp_path / "run.json").read_text()
    assert "NaN" not in text  # strict JSON
    assert json.loads(text)["results"]["mvtec_tire"] == {
        "image_auroc": 0.75, "image_ap": 0.5, "pixel_auroc": None, "pixel_ap": None, "pixel_pro": None,
        "best_epoch": 2}


class _Record:
    def add_result(self, name, result):
        pass


def test_results_table_replaces_an_earlier_row_of_the_same_class(tmp_path):
    utils.compute_and_store_final_results(str(tmp_path), [[0.1] * 5 + [1], [0.2] * 5 + [2]], utils.METRIC_NAMES,
                                          ["mvtec_a", "mvtec_b"])
    table = main.ResultsTable(str(tmp_path), 1, _Record())
    table.add(0, "mvtec_a", [0.9] * 5 + [3])
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["Row Names"] for row in rows] == ["mvtec_b", "mvtec_a", "Mean"]
    assert float(rows[1]["image_auroc"]) == 0.9
    assert float(rows[2]["image_auroc"]) == pytest.approx((0.2 + 0.9) / 2)


def test_results_table_keeps_the_rows_another_run_on_the_folder_wrote_meanwhile(tmp_path):
    ours = main.ResultsTable(str(tmp_path), 2, _Record())
    theirs = main.ResultsTable(str(tmp_path), 1, _Record())  # started at the same time: no results.csv yet
    ours.add(0, "mvtec_a", [0.1] * 5 + [1])
    theirs.add(0, "mvtec_b", [0.2] * 5 + [2])
    ours.add(1, "mvtec_c", [0.3] * 5 + [3])
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["Row Names"] for row in rows] == ["mvtec_b", "mvtec_a", "mvtec_c", "Mean"]
    assert float(rows[-1]["image_auroc"]) == pytest.approx(0.2)


def test_file_lock_is_held_by_one_process_at_a_time_and_released_with_it(tmp_path):
    path = str(tmp_path / ".lock")
    other = [sys.executable, "-c", "import sys, utils\nwith utils.file_lock(sys.argv[1], wait=False) as held:\n"
             "    print(held)", path]
    with utils.file_lock(path) as held:
        assert held
        assert subprocess.run(other, cwd=ROOT, capture_output=True, text=True).stdout.strip() == "False"
    assert subprocess.run(other, cwd=ROOT, capture_output=True, text=True).stdout.strip() == "True"


def test_atomic_write_gives_new_files_the_usual_mode_and_keeps_an_existing_files_mode(tmp_path):
    new = tmp_path / "new.csv"
    utils.atomic_write(str(new), lambda tmp: Path(tmp).write_text("x"))
    assert new.stat().st_mode & 0o777 == 0o666 & ~utils._UMASK
    kept = tmp_path / "kept.csv"
    kept.write_text("old")
    kept.chmod(0o640)
    utils.atomic_write(str(kept), lambda tmp: Path(tmp).write_text("new"))
    assert kept.stat().st_mode & 0o777 == 0o640


def test_the_summary_mean_row_has_no_best_epoch():
    header = ["Row Names", *utils.METRIC_NAMES]
    rows = [["mvtec_a", "0.5", "0.5", "", "", "", "0"], ["mvtec_b", "0.7", "0.7", "", "", "", "1"],
            ["Mean", "0.6", "0.6", "", "", "", "0.5"]]
    table = utils.summary_rows(header, rows)
    assert table[-1][-1] == "" and table[1][-1] == "0"
    mean_line = utils.markdown_table(table).splitlines()[-1]
    assert mean_line.split("|")[-2].strip() == "" and mean_line.count("n/a") == 3


def test_record_epoch_replaces_the_rows_of_a_rerun_epoch(tmp_path):
    path = str(tmp_path / utils.HISTORY_NAME)
    utils.write_history(path, [utils.history_row(e, e, {"loss": 1.0}, None) for e in range(3)])
    utils.record_epoch(str(tmp_path), 1, 7, {"loss": 0.5}, [0.9, 0.0, 0.8, 0.0, 0.0])
    rows = utils.read_history(path)
    assert [row["epoch"] for row in rows] == [0, 1] and rows[1]["loss"] == 0.5 and rows[1]["pixel_auroc"] == 0.8


@pytest.mark.parametrize("damage", [bytes(range(128, 256)) * 2, b"a,b\n1,2\n"])  # not text; another table
def test_a_damaged_history_is_kept_aside_and_a_new_one_started(tmp_path, caplog, damage):
    path = tmp_path / utils.HISTORY_NAME
    path.write_bytes(damage)
    with pytest.raises(ValueError):
        utils.read_history(str(path))
    utils.record_epoch(str(tmp_path), 2, 3, {"loss": 0.5}, None)
    assert (tmp_path / (utils.HISTORY_NAME + ".old")).read_bytes() == damage  # nothing written is lost
    assert [row["epoch"] for row in utils.read_history(str(path))] == [2]
    assert any("kept as" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_plots_of_a_second_backbone_go_to_their_own_folder():
    assert utils.plots_dir("/r", "/r/models/backbone_0/mvtec_tire") == "/r/plots/mvtec_tire"
    assert utils.plots_dir("/r", "/r/models/backbone_1/mvtec_tire/") == "/r/plots/mvtec_tire_backbone_1"
    assert utils.plots_dir("/r", "/r/models/backbone_12/mvtec_tire") == "/r/plots/mvtec_tire_backbone_12"
    assert utils.output_name("mvtec_tire", 0) == "mvtec_tire" and utils.output_name("mvtec_tire", 2) == "mvtec_tire_backbone_2"


def test_a_class_that_stops_in_a_worker_fails_the_parallel_run(two_classes, dtd_root, tmp_path, caplog):
    results = tmp_path / "results"
    assert run_main(["--results_path", results, *TWO_NET, *tiny_dataset_args(two_classes, dtd_root)]) == 0  # tire only
    code, out, err = captured_run(["--test", "test", *two_class_args(results, two_classes, dtd_root)], "2")
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("Error: mvtec_tire2: no ckpt_best_*.pth"), err[-2000:]
    record = json.loads((results / "run.json").read_text())
    assert [m.split(":")[0] for m in record["stopped"]] == ["mvtec_tire2"] and set(record["results"]) == {"mvtec_tire"}
    # The worker's error reaches the parent as the error, not also as a worker warning.
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "no ckpt_best" in r.getMessage()]


def test_judgements_made_in_workers_are_recorded(two_classes, dtd_root, tmp_path):
    import pandas as pd

    results = tmp_path / "results"
    args = two_class_args(results, two_classes, dtd_root)
    args[args.index("--distribution") + 1] = "1"
    code, out, err = captured_run(args, "2")
    assert code == 0, err[-2000:]
    table = pd.read_excel(results / "datasets" / "excel" / "mvtec_distribution.xlsx")
    assert sorted(table["Class"]) == ["mvtec_tire", "mvtec_tire2"]


def test_progress_bars_need_a_terminal_with_a_width(monkeypatch, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal, open(tmp_path / "log", "w") as log:
        monkeypatch.setattr(sys, "stderr", terminal)
        for columns, live in ((0, False), (80, True)):  # 0: `docker run -t` without a size, where bars draw nothing
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
            assert utils.live_terminal() is live, columns
        monkeypatch.setattr(sys, "stderr", log)  # a log file: per-epoch log lines instead
        assert utils.live_terminal() is False
    os.close(master)
