"""The benchmark scripts of bench/ still run, check what they claim to check, and refuse a missing device."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench import gas_speed, machine, predict_speed
from conftest import ROOT, SHARED_DATA


@pytest.fixture
def no_accelerator(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_device_falls_back_to_the_cpu(no_accelerator):
    assert machine.bench_device("auto") == torch.device("cpu")
    assert machine.bench_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "mps", "tpu"])
def test_a_missing_device_is_one_line_and_exit_code_2(no_accelerator, name, capsys):
    with pytest.raises(SystemExit) as stop:
        machine.bench_device(name)
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith(f"Error: --device {name}:") and message.count("\n") == 1


def test_cpu_has_no_device_memory_peak():
    cpu = torch.device("cpu")
    machine.synchronize(cpu)
    machine.reset_peak_device_memory(cpu)
    assert machine.peak_device_memory_mb(cpu) != machine.peak_device_memory_mb(cpu)  # NaN
    assert machine.describe_device(cpu) == "CPU"
    assert "timed on" not in machine.describe_machine(1, device=cpu)


@pytest.mark.parametrize("script, argv, message", [
    ("train_speed.py", ["--seed", "-1"], "argument --seed: -1 is out of range: give from 0 to 4294967295"),
    ("train_speed.py", ["--repeats", "0"], "argument --repeats: 0 is out of range: give 1 or more"),
    ("gas_speed.py", ["--threads", "two"], "argument --threads: 'two' is not a whole number"),
    ("predict_speed.py", ["--batches", "8", "0"], "argument --batches: 0 is out of range: give 1 or more"),
    ("malloc_speed.py", ["--steps", "1"], "argument --steps: 1 is out of range: give 2 or more"),
])
def test_bench_options_out_of_range_are_usage_errors(script, argv, message):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), *argv], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines()[-1].endswith(message) and "Traceback" not in run.stderr


def test_bench_seed_range_is_the_trainers():
    import utils

    assert machine.MAX_SEED == utils.MAX_SEED


def test_gas_speed_times_every_pass_and_finds_the_same_bits(capsys):
    assert gas_speed.main(["--repeats", "1", "--threads", "0"]) == 0  # 0: torch's threads left as they are
    out = capsys.readouterr().out
    for name in ("plain", "frozen, autograd", "frozen, by hand", "floor"):
        assert f"\n{name} " in out
    assert "plain and FrozenTrueHalf.gradient: the same bits" in out


def test_predict_speed_on_real_images_checks_the_fast_embedding():
    run = subprocess.run(  # its own process: the script sets up logging and the allocator for itself
        [sys.executable, str(ROOT / "bench" / "predict_speed.py"), "--profile", "tiny", "--images", "8", "--batches",
         "8", "--repeats", "1", "--data", str(SHARED_DATA)],
        capture_output=True, text=True, timeout=600)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr[-2000:]
    assert "bit for bit (embeddings, scores, maps): True" in out
    assert "batch 8: predict / backbone" in out
    for phase in predict_speed.PHASES:
        assert f"\n{phase} " in out


def test_train_speed_runs_both_data_flows_side_by_side(tmp_path):
    """One epoch of the tiny profile per flow: the reference flow writes a heatmap per test image at its
    evaluation and builds no cache; this flow writes none during training and caches the features."""
    figures = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--profile", "tiny", "--epochs", "1", "--data",
         str(SHARED_DATA), "--json", str(figures)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "epoch incl. evaluation, all epochs (s)" in run.stdout
    runs = json.loads(figures.read_text())
    this, reference = runs["this"][0], runs["reference"][0]
    assert len(this["epochs"]) == len(reference["epochs"]) == 1
    assert reference["training_heatmaps"] == reference["test_images"] == 112
    assert this["training_heatmaps"] == 0
    assert this["cache_mb"] > 0 and reference["cache_mb"] == 0
    assert len(this["test_result"]) == len(reference["test_result"]) == 6


def test_malloc_speed_compares_both_settings_on_the_same_bits():
    """Both children train and predict (at a tiny size); the driver compares their scores and figures."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "malloc_speed.py"), "--imagesize", "64", "--dim", "64", "--dsc_hidden",
         "64", "--steps", "2", "--predicts", "1", "--data", str(SHARED_DATA)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert "Same predicted scores with both settings: True" in run.stdout
    for row in ("training step (s)", "page faults per step", "predict, batch 8 (ms per image)",
                "peak resident memory (MB)"):
        assert f"\n{row} " in run.stdout
    import utils
    assert ("did not apply here" in run.stdout) != bool(utils.glibc_version())


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent"], "Error: --data /nonexistent: no folder /nonexistent/mvtec3d/tire: give the shared "
                                 "data folder (mvtec3d/tire and dtd/images inside)"),
    (["--json", "/nonexistent_dir/raw.json"], "Error: --json /nonexistent_dir/raw.json: the folder /nonexistent_dir "
                                              "does not exist: create it or choose another path"),
])
def test_train_speed_checks_its_paths_before_any_run(argv, message):
    """A missing data folder stopped the first child with its traceback; a --json path that cannot be written lost
    the figures of the whole benchmark at the end."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train_speed.py"), "--profile", "tiny",
                          "--data", str(SHARED_DATA), *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [message]


def test_train_speed_names_the_run_that_failed(tmp_path):
    """A child that stops before training is named in words ("the this run" read as garbled)."""
    for folder in ("mvtec3d/tire", "dtd/images"):  # there, but empty: the first child stops on the layout
        (tmp_path / folder).mkdir(parents=True)
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train_speed.py"), "--profile", "tiny", "--data",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    error, failed = run.stderr.splitlines()[-2:]
    assert error.startswith("Error: MVTec AD layout problems in ") and "1 missing folder (tire/test;" in error
    assert failed == "train_speed: this implementation's run failed before training (exit code 2)"


def test_calibrate_sh_runs_without_a_venv_and_reads_data_from_the_callers_folder(tmp_path):
    """Without .venv it takes python3 (as shell/_common.sh does); a relative DATA is the caller's, not the repo's."""
    import os
    import shutil

    repo = tmp_path / "repo"  # a checkout without .venv: only the two scripts
    for script in ("bench/calibrate.sh", "shell/_common.sh"):
        (repo / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / script, repo / script)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "python3").write_text('#!/bin/sh\necho "$PWD $*" >> "$CALLS"\n')  # records where and how it ran
    (tools / "python3").chmod(0o755)
    caller = tmp_path / "caller"
    (caller / "data").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"), "DATA": "data"}
    env.pop("PYTHON", None)
    run = subprocess.run(["bash", str(repo / "bench" / "calibrate.sh"), "tire"], cwd=caller, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    [call] = (tmp_path / "calls").read_text().splitlines()
    assert call.startswith(f"{repo} main.py --gpu 0 ")
    assert call.endswith(f" mvtec {caller}/data/mvtec3d {caller}/data/dtd/images")

    env["DATA"] = "missing"
    run = subprocess.run(["bash", str(repo / "bench" / "calibrate.sh")], cwd=caller, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith(f"Error: DATA={caller}/missing is not a folder")
