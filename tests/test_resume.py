"""Interrupted runs: a killed training run resumes from ckpt.pth and ends as an uninterrupted one would.

Runs use the tiny profile on an even smaller `tire` subset, 3 epochs, on the CPU. Training is
interrupted with the test-only hook ``GLASS_TEST_KILL_AT=EPOCH:STEP`` (glass.KILL_HOOK_ENV): the
trainer SIGKILLs itself just before that step (or, with ``EPOCH:saved``, right after writing that
epoch's ckpt.pth and before its new best checkpoint), which is what an external ``kill -9`` at that
moment would do, without the timing races of killing from outside.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import glass
import utils
from conftest import TINY_NET, copy_class_subset, run_main, tiny_dataset_args

ROOT = Path(__file__).resolve().parents[1]
# 3 epochs of one training step each; with this learning rate every epoch is a new best, so best
# checkpoints get replaced.
NET = [*TINY_NET, "--meta_epochs", "3", "--limit", "4", "--lr", "0.001"]
CLASS_DIR = Path("models") / "backbone_0" / "mvtec_tire"


@pytest.fixture(scope="module")
def small_tire(tmp_path_factory, tire_root) -> Path:
    """8 training images, 3 good and 4 defective test images."""
    root = tmp_path_factory.mktemp("small_tire")
    copy_class_subset(tire_root / "tire", root / "tire", n_train=8, n_good=3, n_per_defect=1)
    return root


def arguments(results: Path, data: Path, dtd: Path, net_extra=()) -> list:
    return ["--results_path", str(results), *NET, *net_extra, *tiny_dataset_args(data, dtd)]


def run_subprocess(args, kill_at: str | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` in a fresh process (optionally with the kill hook set, and more variables)."""
    env = {key: value for key, value in os.environ.items() if key != glass.KILL_HOOK_ENV}
    if kill_at is not None:
        env[glass.KILL_HOOK_ENV] = kill_at
    env.update(extra_env)
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def flatten(value, prefix=""):
    """(path, leaf) pairs of a nested checkpoint (dicts, lists, tuples)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def assert_same_checkpoint(path_a: Path, path_b: Path) -> None:
    """Every tensor and value of two checkpoint files is identical (NaN equals NaN)."""
    a = dict(flatten(torch.load(path_a, weights_only=True)))
    b = dict(flatten(torch.load(path_b, weights_only=True)))
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key


def read_rows(results: Path) -> list:
    with open(results / "results.csv") as handle:
        return list(csv.DictReader(handle))


def best_files(class_dir: Path) -> list:
    return sorted(p.name for p in class_dir.glob("ckpt_best_*.pth"))


def assert_same_outcome(a: Path, b: Path) -> None:
    """Same results.csv, same best checkpoint (name and tensors), same ckpt.pth (all of it)."""
    assert read_rows(a) == read_rows(b)
    assert best_files(a / CLASS_DIR) == best_files(b / CLASS_DIR) and len(best_files(a / CLASS_DIR)) == 1
    best = best_files(a / CLASS_DIR)[0]
    assert_same_checkpoint(a / CLASS_DIR / best, b / CLASS_DIR / best)
    assert_same_checkpoint(a / CLASS_DIR / "ckpt.pth", b / CLASS_DIR / "ckpt.pth")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_tire, dtd_root) -> Path:
    """Results of an uninterrupted 3-epoch run (in this process)."""
    results = tmp_path_factory.mktemp("uninterrupted")
    assert run_main(arguments(results, small_tire, dtd_root)) == 0
    assert best_files(results / CLASS_DIR) == ["ckpt_best_2.pth"]  # earlier bests were replaced
    return results


@pytest.fixture(scope="module")
def killed_in_epoch_1(tmp_path_factory, small_tire, dtd_root) -> Path:
    """Results folder of a run killed during epoch 1 (centre computed, before its training step)."""
    results = tmp_path_factory.mktemp("killed")
    done = run_subprocess(arguments(results, small_tire, dtd_root), kill_at="1:0")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    state = torch.load(results / CLASS_DIR / "ckpt.pth", weights_only=True)
    assert state["epoch"] == 0 and state["best_checkpoint"] == "ckpt_best_0.pth"
    assert not (results / "results.csv").exists()
    return results


def test_killed_run_resumes_and_ends_as_an_uninterrupted_run(tmp_path, killed_in_epoch_1, uninterrupted, small_tire, dtd_root,
                                                              caplog):
    caplog.set_level("INFO")
    results = tmp_path / "results"
    shutil.copytree(killed_in_epoch_1, results)
    assert run_main(arguments(results, small_tire, dtd_root)) == 0
    assert "resuming from" in caplog.text and "(1 of 3 epochs done)" in caplog.text
    # stderr is no terminal here: one log line per epoch instead of a progress bar
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mvtec_tire: epoch:")]
    assert [m.split()[1] for m in epochs] == ["epoch:1", "epoch:2"] and all("IAUC:" in m for m in epochs)
    assert_same_outcome(results, uninterrupted)


def test_killed_in_the_middle_of_an_epoch_with_loader_workers_resumes_as_uninterrupted(tmp_path, small_tire, dtd_root,
                                                                                       caplog):
    # Batches of 4 of the 8 training images: two steps per epoch; killed after epoch 1's first step, with the
    # synthesis in two DataLoader worker processes (their seeds come from the main process's generator).
    def run_arguments(results: Path) -> list:
        return ["--results_path", str(results), *NET,
                *tiny_dataset_args(small_tire, dtd_root, extra=("--batch_size", "4", "--num_workers", "2"))]

    uninterrupted = tmp_path / "uninterrupted"
    assert run_main(run_arguments(uninterrupted)) == 0
    steps = [int(row["step"]) for row in csv.DictReader(open(uninterrupted / CLASS_DIR / "history.csv"))]
    assert steps == [2, 4, 6]  # two training steps per epoch (global step after each epoch)
    results = tmp_path / "results"
    done = run_subprocess(run_arguments(results), kill_at="1:1")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert torch.load(results / CLASS_DIR / "ckpt.pth", weights_only=True)["global_step"] == 2
    caplog.set_level("INFO")
    assert run_main(run_arguments(results)) == 0
    assert "(1 of 3 epochs done)" in caplog.text
    assert_same_outcome(results, uninterrupted)


def test_sigterm_is_recorded_as_an_interruption_and_the_run_resumes(tmp_path, uninterrupted, small_tire, dtd_root):
    results = tmp_path / "results"
    done = run_subprocess(arguments(results, small_tire, dtd_root), kill_at="1:0", GLASS_TEST_KILL_SIGNAL="SIGTERM")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == ("Terminated (SIGTERM): rerun the same command to go on (training resumes "
                                            "after its last finished epoch).") and "Traceback" not in done.stderr
    assert json.loads((results / "run.json").read_text())["status"] == "interrupted"
    assert run_main(arguments(results, small_tire, dtd_root)) == 0
    assert_same_outcome(results, uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signals_interrupt_only_inside_the_block(signum):
    received = []
    previous = signal.signal(signum, lambda *args: received.append(args[0]))  # never the default: it would end pytest
    try:
        with pytest.raises(utils.Terminated, match=signal.Signals(signum).name) as info:
            with utils.termination_as_interrupt():
                os.kill(os.getpid(), signum)
                time.sleep(2)  # the handler runs as soon as the signal arrives
        assert isinstance(info.value, KeyboardInterrupt) and not received  # the CLI records it as interrupted
        try:  # outside the block: the handler from before again
            os.kill(os.getpid(), signum)
            time.sleep(0.1)
        except utils.Terminated:
            pytest.fail("the signal still interrupts after the block")
        assert received == [signum]
    finally:
        signal.signal(signum, previous)


def test_an_ignored_signal_stays_ignored():
    # Under `nohup` SIGHUP is ignored: closing the terminal must not interrupt a long training run.
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGHUP, signal.SIGINT)}
    try:
        with utils.termination_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
            with utils.interruptions_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(0.1)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_resume_with_the_feature_cache_off_ends_as_the_cached_run(tmp_path, killed_in_epoch_1, uninterrupted, small_tire,
                                                                   dtd_root, caplog):
    # The killed and the uninterrupted runs cached their features (--cache auto); the cache changes no number,
    # so resuming without it ends the same, and it is not reported as a changed training option.
    caplog.set_level("INFO")
    results = tmp_path / "results"
    shutil.copytree(killed_in_epoch_1, results)
    assert run_main(arguments(results, small_tire, dtd_root, net_extra=["--cache", "off"])) == 0
    assert "resuming from" in caplog.text and "other training options" not in caplog.text
    assert "Feature cache:" not in caplog.text
    assert_same_outcome(results, uninterrupted)


def test_killed_run_with_train_backbone_resumes_with_its_accumulated_backbone_gradients(tmp_path, small_tire, dtd_root):
    # The reference never clears the backbone's gradients: ckpt.pth must carry them for the resumed run to
    # end as the uninterrupted one.
    extra = ["--train_backbone"]
    uninterrupted = tmp_path / "uninterrupted"
    assert run_main(arguments(uninterrupted, small_tire, dtd_root, net_extra=extra)) == 0
    state = torch.load(uninterrupted / CLASS_DIR / "ckpt.pth", weights_only=True)
    assert state["backbone_grad"] and set(state["backbone_grad"]) <= set(state["backbone"])
    results = tmp_path / "results"
    done = run_subprocess(arguments(results, small_tire, dtd_root, net_extra=extra), kill_at="1:0")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert run_main(arguments(results, small_tire, dtd_root, net_extra=extra)) == 0
    assert_same_outcome(results, uninterrupted)


def test_kill_between_ckpt_and_new_best_is_repaired(tmp_path, uninterrupted, small_tire, dtd_root):
    results = tmp_path / "results"
    done = run_subprocess(arguments(results, small_tire, dtd_root), kill_at="1:saved")
    assert done.returncode == -signal.SIGKILL
    # ckpt.pth of epoch 1 names ckpt_best_1.pth, which was not written yet; the old best is still there.
    assert best_files(results / CLASS_DIR) == ["ckpt_best_0.pth"]
    assert torch.load(results / CLASS_DIR / "ckpt.pth", weights_only=True)["best_checkpoint"] == "ckpt_best_1.pth"

    assert run_main(arguments(results, small_tire, dtd_root)) == 0
    assert_same_outcome(results, uninterrupted)


def test_same_seed_gives_identical_metrics_and_checkpoints(tmp_path, uninterrupted, small_tire, dtd_root):
    # Another process, the same command; glibc's default malloc settings there, freed memory kept in this
    # process (utils.keep_freed_memory): where tensors are allocated changes no number.
    results = tmp_path / "results"
    done = run_subprocess(arguments(results, small_tire, dtd_root), GLASS_MALLOC="system")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_outcome(results, uninterrupted)
    for name in (*best_files(results / CLASS_DIR), "ckpt.pth"):  # the very bytes
        assert (results / CLASS_DIR / name).read_bytes() == (uninterrupted / CLASS_DIR / name).read_bytes(), name


def test_finished_class_is_only_tested(tmp_path, uninterrupted, small_tire, dtd_root, capsys):
    results = tmp_path / "results"
    shutil.copytree(uninterrupted, results)
    before = {p.name: p.read_bytes() for p in (results / CLASS_DIR).glob("*.pth")}
    assert run_main(arguments(results, small_tire, dtd_root)) == 0
    assert "mvtec_tire: already trained (3 epochs), testing its best checkpoint" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (results / CLASS_DIR).glob("*.pth")} == before
    assert read_rows(results) == read_rows(uninterrupted)


def test_a_finished_class_trained_longer_than_asked_says_so(tmp_path, uninterrupted, small_tire, dtd_root, capsys):
    results = tmp_path / "results"
    shutil.copytree(uninterrupted, results)
    assert run_main(arguments(results, small_tire, dtd_root, net_extra=["--meta_epochs", "2"])) == 0
    assert ("mvtec_tire: already trained (3 epochs, more than the 2 asked for), testing its best checkpoint"
            in capsys.readouterr().out)
    assert read_rows(results) == read_rows(uninterrupted)


def test_a_folder_in_the_reference_format_is_only_tested_and_the_run_says_why(tmp_path, uninterrupted, small_tire,
                                                                              dtd_root, capsys):
    """The reference writes ckpt.pth with the weights only (no training state), and some folders have none."""
    results = tmp_path / "results"
    shutil.copytree(uninterrupted, results)
    state = torch.load(results / CLASS_DIR / "ckpt.pth", weights_only=True)
    torch.save({key: state[key] for key in glass.CHECKPOINT_KEYS}, results / CLASS_DIR / "ckpt.pth")
    assert run_main(arguments(results, small_tire, dtd_root)) == 0
    assert ("mvtec_tire: already trained (ckpt_best_2.pth and a ckpt.pth without training state: by the reference?)"
            in capsys.readouterr().out)
    (results / CLASS_DIR / "ckpt.pth").unlink()
    assert run_main(arguments(results, small_tire, dtd_root)) == 0
    assert "mvtec_tire: already trained (ckpt_best_2.pth and no ckpt.pth: by the reference?)" in capsys.readouterr().out
    assert read_rows(results) == read_rows(uninterrupted)


def test_training_on_to_more_epochs_is_not_called_a_changed_option(tmp_path, killed_in_epoch_1, small_tire, dtd_root,
                                                                   caplog):
    caplog.set_level("INFO")
    results = tmp_path / "results"
    shutil.copytree(killed_in_epoch_1, results)
    assert run_main(arguments(results, small_tire, dtd_root, net_extra=["--meta_epochs", "4"])) == 0
    assert "mvtec_tire: training to 4 epochs (its last run was for 3)" in caplog.text
    assert "(1 of 4 epochs done)" in caplog.text and "other training options" not in caplog.text
    longer = tmp_path / "longer"  # the same as a run of 4 epochs from the start
    assert run_main(arguments(longer, small_tire, dtd_root, net_extra=["--meta_epochs", "4"])) == 0
    assert_same_outcome(results, longer)


def test_test_only_judges_an_unfinished_training_by_its_own_epochs(tmp_path, killed_in_epoch_1, small_tire, dtd_root,
                                                                  caplog):
    """--test test without the training's --meta_epochs (here the default, 640) and at another --resize."""
    caplog.set_level("INFO")
    results = tmp_path / "results"
    shutil.copytree(killed_in_epoch_1, results)
    net = [arg for i, arg in enumerate(NET) if "--meta_epochs" not in (arg, NET[i - 1])]
    args = ["--test", "test", "--results_path", str(results), *net,
            *tiny_dataset_args(small_tire, dtd_root, extra=["--resize", "72"])]
    assert run_main(args) == 0
    assert ("Training of mvtec_tire stopped after 1 of 3 epochs: testing its best checkpoint so far (rerun with "
            "--test ckpt --meta_epochs 3 to finish training)") in caplog.text
    assert "Testing mvtec_tire on images prepared otherwise than at its training (dataset.resize: 64 -> 72;" in caplog.text


@pytest.mark.parametrize("change, named", [
    (["--target_embed_dimension", "64"], "target_embed_dimension: 128 -> 64"),
    (["-le", "blocks.3"], "layers_to_extract_from: ['blocks.2', 'blocks.4'] -> ['blocks.2', 'blocks.4', 'blocks.3']"),
])
def test_resume_refuses_other_model_options(tmp_path, killed_in_epoch_1, small_tire, dtd_root, capsys, change, named):
    results = tmp_path / "results"
    shutil.copytree(killed_in_epoch_1, results)
    before = {p.name: p.read_bytes() for p in (results / CLASS_DIR).iterdir() if p.is_file()}
    assert run_main(arguments(results, small_tire, dtd_root, net_extra=change)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and named in errors[0] and "another --results_path" in errors[0]
    assert {p.name: p.read_bytes() for p in (results / CLASS_DIR).iterdir() if p.is_file()} == before


def test_run_record(uninterrupted):
    latest = json.loads((uninterrupted / "run.json").read_text())
    stamped = sorted(uninterrupted.glob("run_*.json"))
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == latest
    assert latest["status"] == "finished" and latest["finished"] >= latest["started"]
    assert latest["command_line"][:3] == ["main.py", "--results_path", str(uninterrupted)]
    assert latest["options"]["main"]["seed"] == 0 and latest["options"]["net"]["meta_epochs"] == 3
    assert latest["options"]["dataset"]["imagesize"] == 64 and latest["options"]["dataset"]["subdatasets"] == ["tire"]
    assert {"torch", "torchvision", "timm", "numpy"} <= set(latest["packages"])
    assert latest["packages"]["torch"] == torch.__version__.split("+")[0]
    assert latest["torch_threads"] == torch.get_num_threads()
    commit = latest["git_commit"]
    assert commit == "unknown" or len(commit.split("+")[0]) == 40
    assert set(latest["results"]) == {"mvtec_tire"} and latest["results"]["mvtec_tire"]["best_epoch"] == 2


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert utils.git_commit(str(tmp_path)) == "unknown"


# --------------------------------------------------------------------------------------------------
# Unit tests: the resume state and the atomic writes

@pytest.fixture(scope="module")
def tiny_model_factory():
    import backbones

    def make(seed: int) -> glass.GLASS:
        torch.manual_seed(seed)
        model = glass.GLASS(torch.device("cpu"))
        model.load(backbone=backbones.load("efficientnet_lite0"), layers_to_extract_from=["blocks.2", "blocks.4"],
                   device=torch.device("cpu"), input_shape=(3, 64, 64), pretrain_embed_dimension=32,
                   target_embed_dimension=32, dsc_hidden=16, meta_epochs=3, step=2)
        return model
    return make


def test_training_state_round_trip(tmp_path, tiny_model_factory):
    model = tiny_model_factory(seed=1)
    model.ckpt_dir = str(tmp_path)
    batch = {"image": torch.randn(2, 3, 64, 64), "aug": torch.randn(2, 3, 64, 64),
             "mask_s": (torch.rand(2, 8, 8) > 0.5).float()}
    model._compute_center([batch])
    model._train_step(batch)  # fills the optimisers' states
    model.global_step, model.hypersphere, model.judged_distribution = 7, 1, 1
    record = [np.float64(0.75), 0.0, float("nan"), 0.0, 0.0, 2]

    path = tmp_path / "ckpt.pth"
    utils.atomic_torch_save(model.training_checkpoint(2, model.checkpoint_state(), record, str(tmp_path / "ckpt_best_2.pth")), path)
    draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3))  # right after the state was taken

    state = torch.load(path, weights_only=True)  # plain tensors and values only
    assert {"discriminator", "pre_projection", "dsc_opt", "proj_opt", "rng", "epoch", "best_record"} <= set(state)
    other = tiny_model_factory(seed=2)
    other.ckpt_dir = str(tmp_path)
    epoch, best_record, best_path = other.restore_training_checkpoint(state, str(path))
    assert (epoch, best_path, other.global_step, other.hypersphere, other.judged_distribution) == (2, str(tmp_path / "ckpt_best_2.pth"), 7, 1, 1)
    assert best_record[:2] == [0.75, 0.0] and np.isnan(best_record[2]) and best_record[-1] == 2
    for a, b in ((model.discriminator, other.discriminator), (model.pre_projection, other.pre_projection)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for a, b in ((model.dsc_opt, other.dsc_opt), (model.proj_opt, other.proj_opt)):
        assert dict(flatten(a.state_dict()["state"])).keys() == dict(flatten(b.state_dict()["state"])).keys()
        for (_, x), (_, y) in zip(flatten(a.state_dict()["state"]), flatten(b.state_dict()["state"])):
            assert torch.equal(x, y)

    glass.set_rng_state(state["rng"])
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert again[:2] == draws[:2] and torch.equal(again[2], draws[2])


def test_settle_best_checkpoint(tmp_path, tiny_model_factory):
    model = tiny_model_factory(seed=1)
    model.ckpt_dir = str(tmp_path)
    weights = model.checkpoint_state()
    state = model.training_checkpoint(4, weights, [0.9, 0, 0.9, 0, 0, 4], str(tmp_path / "ckpt_best_4.pth"))
    torch.save({"discriminator": {}}, tmp_path / "ckpt_best_1.pth")  # the previous best, not yet removed
    model._settle_best_checkpoint(state)
    assert best_files(tmp_path) == ["ckpt_best_4.pth"]  # written from ckpt.pth's weights, the old one gone
    assert_same_checkpoint(tmp_path / "ckpt_best_4.pth", _saved(tmp_path / "expected.pth", weights))

    os.remove(tmp_path / "ckpt_best_4.pth")
    state = model.training_checkpoint(5, weights, [0.9, 0, 0.9, 0, 0, 4], str(tmp_path / "ckpt_best_4.pth"))
    with pytest.raises(utils.GlassError, match="ckpt_best_4.pth recorded in ckpt.pth is missing"):
        model._settle_best_checkpoint(state)


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old\n")

    def fail(tmp):
        Path(tmp).write_text("half of the new")
        raise KeyboardInterrupt  # as if the run were stopped in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        utils.atomic_write(str(target), fail)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["results.csv"]
    utils.atomic_write(str(target), lambda tmp: Path(tmp).write_text("new\n"))
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["results.csv"]


def test_saved_checkpoints_of_equal_contents_are_equal_bytes(tmp_path):
    """The temporary file's random name must not reach the archive (identical runs give identical files)."""
    state = {"discriminator": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
    utils.atomic_torch_save(state, str(tmp_path / "ckpt_best_3.pth"))
    (tmp_path / "other").mkdir()
    utils.atomic_torch_save(state, str(tmp_path / "other" / "ckpt_best_3.pth"))
    first, second = (tmp_path / "ckpt_best_3.pth").read_bytes(), (tmp_path / "other" / "ckpt_best_3.pth").read_bytes()
    assert first == second
    assert torch.equal(torch.load(tmp_path / "ckpt_best_3.pth", weights_only=True)["discriminator"]["w"],
                       state["discriminator"]["w"])


def test_atomic_write_failures_are_one_line_errors_that_keep_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pth"
    target.write_text("old")

    def full_disk(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    with pytest.raises(utils.GlassError, match=r"cannot write .*ckpt.pth \(No space left on device\): free some disk space"):
        utils.atomic_write(str(target), full_disk)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["ckpt.pth"]

    def zip_writer_failure(tmp):  # how torch.save reports a full disk
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")

    monkeypatch.setattr(utils, "_disk_nearly_full", lambda directory: True)
    with pytest.raises(utils.GlassError, match="no space left on the device"):
        utils.atomic_write(str(target), zip_writer_failure)
    monkeypatch.setattr(utils, "_disk_nearly_full", lambda directory: False)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left it is not the disk: a real error
        utils.atomic_write(str(target), zip_writer_failure)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["ckpt.pth"]


def test_best_checkpoint_is_the_highest_epoch_even_under_a_folder_name_with_glob_characters(tmp_path):
    folder = tmp_path / "run[1]*" / "mvtec_tire"
    folder.mkdir(parents=True)
    for name in ("ckpt_best_3.pth", "ckpt_best_10.pth", "ckpt_best_x.pth", "ckpt.pth"):
        (folder / name).write_bytes(b"")
    assert glass.best_checkpoint_in(str(folder)) == str(folder / "ckpt_best_10.pth")
    assert glass.best_checkpoint_in(str(tmp_path)) is None


def test_a_later_epoch_that_only_ties_the_best_does_not_replace_it(tmp_path, small_tire, dtd_root, monkeypatch):
    # Model selection by image AUROC + pixel AUROC, strictly greater: both epochs sum to 1.25.
    records = {0: [0.75, 0.0, 0.5, 0.0, 0.0], 1: [0.5, 0.0, 0.75, 0.0, 0.0]}
    monkeypatch.setattr(glass.GLASS, "_evaluate_epoch", lambda self, val_data, epoch, name, best_path: records[epoch])
    results = tmp_path / "results"
    assert run_main(arguments(results, small_tire, dtd_root, net_extra=["--meta_epochs", "2"])) == 0
    assert best_files(results / CLASS_DIR) == ["ckpt_best_0.pth"]
    assert torch.load(results / CLASS_DIR / "ckpt.pth", weights_only=True)["best_record"] == [0.75, 0.0, 0.5, 0.0, 0.0, 0]


def test_config_differences_name_train_backbone_seed_and_ignore_speed_defaults():
    assert glass.config_differences({"net": {"train_backbone": False}}, {"net": {"train_backbone": True}}) == \
        ["train_backbone: False -> True"]
    assert glass.other_differences({"seed": 0}, {"seed": 1}) == ["seed: 0 -> 1"]
    # A config.json written before the speed options existed equals one with their defaults.
    assert glass.other_differences({"net": {"lr": 0.1}}, {"net": {"lr": 0.1, **glass.SPEED_OPTION_DEFAULTS}}) == []


def _tiny_config(seed=0):
    return {"backbone": "efficientnet_lite0", "layers_to_extract_from": ["blocks.2", "blocks.4"],
            "input_shape": [3, 64, 64], "seed": seed, "dataset": {"resize": 64, "imagesize": 64},
            "net": {"pretrain_embed_dimension": 32, "target_embed_dimension": 32, "patchsize": 3, "dsc_layers": 2,
                    "dsc_hidden": 16, "pre_proj": 1, "train_backbone": False, "lr": 0.0001}}


def _folder_with_ckpt(tmp_path, tiny_model_factory, epoch, best_epoch):
    """A tiny model (--meta_epochs 3) whose class folder is ``tmp_path``, holding a ckpt.pth of ``epoch`` that records
    ckpt_best_<best_epoch>.pth as the best (not written); returns the model and its checkpoint weights."""
    model = tiny_model_factory(seed=1)
    model.ckpt_dir = str(tmp_path)
    weights = model.checkpoint_state()
    best = tmp_path / f"ckpt_best_{best_epoch}.pth"
    torch.save(model.training_checkpoint(epoch, weights, [0.9, 0, 0.9, 0, 0, best_epoch], str(best)),
               tmp_path / "ckpt.pth")
    return model, weights


def test_check_config_on_an_unfinished_folder(tmp_path, tiny_model_factory, caplog):
    # ckpt.pth of epoch 1 names ckpt_best_1.pth, not written yet (killed); the old best is still there.
    model, weights = _folder_with_ckpt(tmp_path, tiny_model_factory, epoch=1, best_epoch=1)
    torch.save(weights, tmp_path / "ckpt_best_0.pth")

    # Resuming without config.json (written by an older version) records it.
    model.check_config(_tiny_config(), training=True)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0
    # Resuming with another training option warns.
    caplog.clear()
    model.check_config(_tiny_config(seed=1), training=True)
    assert "Resuming" in caplog.text and "with other training options than it started with (seed: 0 -> 1)" in caplog.text
    # A test-only run writes the missing recorded best, which is then tested, and removes nothing.
    os.remove(tmp_path / "ckpt_best_1.pth")
    torch.save(weights, tmp_path / "ckpt_best_0.pth")
    model.check_config(_tiny_config(), training=False)
    assert sorted(p.name for p in tmp_path.glob("ckpt_best_*.pth")) == ["ckpt_best_0.pth", "ckpt_best_1.pth"]
    assert model.best_checkpoint() == str(tmp_path / "ckpt_best_1.pth")


def test_a_best_checkpoint_put_there_by_hand_is_never_removed(tmp_path, tiny_model_factory, caplog):
    model, weights = _folder_with_ckpt(tmp_path, tiny_model_factory, epoch=2, best_epoch=1)
    torch.save(weights, tmp_path / "ckpt_best_1.pth")
    torch.save(weights, tmp_path / "ckpt_best_5.pth")  # a higher epoch than recorded: no kill leaves one
    (tmp_path / "ckpt_best_7.pth").mkdir()  # not a checkpoint file at all
    files = {p.name: p.read_bytes() for p in tmp_path.glob("ckpt_best_*.pth") if p.is_file()}

    model.check_config(_tiny_config(), training=False)  # tested, as the highest epoch, with a warning
    assert model.best_checkpoint() == str(tmp_path / "ckpt_best_5.pth")
    assert "Testing " in caplog.text and "ckpt_best_5.pth, the highest epoch" in caplog.text
    assert "although ckpt.pth records ckpt_best_1.pth as the best" in caplog.text
    with pytest.raises(utils.GlassError, match=r"ckpt_best_5.pth was not written by this class's training .*"
                                               r"move it out of .* to train, or test it with --test test"):
        model.check_config(_tiny_config(), training=True)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ckpt_best_*.pth") if p.is_file()} == files
    assert (tmp_path / "ckpt_best_7.pth").is_dir()


def test_training_a_finished_folder_on_to_more_epochs_is_a_resume(tmp_path, tiny_model_factory, caplog):
    model, weights = _folder_with_ckpt(tmp_path, tiny_model_factory, epoch=2, best_epoch=2)  # --meta_epochs 3
    torch.save(weights, tmp_path / "ckpt_best_2.pth")
    model.save_config(_tiny_config())
    model.meta_epochs = 4  # trained on to 4 epochs, with another seed
    model.check_config(_tiny_config(seed=1), training=True)
    assert "with other training options than it started with (seed: 0 -> 1)" in caplog.text


def test_a_finished_folder_names_the_training_options_it_ignores_and_another_class(tmp_path, tiny_model_factory, caplog):
    model, weights = _folder_with_ckpt(tmp_path, tiny_model_factory, epoch=2, best_epoch=2)  # finished: 3 epochs
    torch.save(weights, tmp_path / "ckpt_best_2.pth")
    config = _tiny_config()
    config["dataset"]["classname"] = "tire"
    model.save_config(config)
    model.check_config(config, training=True)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # --fuse_head (a speed option) applies to the test, so it is not among the options the folder ignores.
    changed = {**config, "net": {**config["net"], "lr": 0.01, "fuse_head": True},
               "dataset": {**config["dataset"], "classname": "cable"}}
    model.check_config(changed, training=True)
    assert "is already trained, with other training options than this run's (net.lr: 0.0001 -> 0.01), which it " \
           "ignores" in caplog.text
    assert "holds a model of another class (dataset.classname: tire -> cable)" in caplog.text
    caplog.clear()
    model.check_config(changed, training=False)  # a test-only run asks for no training: only the class is named
    assert "already trained" not in caplog.text and "another class" in caplog.text


def test_config_without_a_feature_adaptor_is_usable():
    config = _tiny_config()
    config["net"]["pre_proj"] = 0
    assert glass.config_problem(config) is None
