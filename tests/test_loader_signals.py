"""Ctrl-C and SIGTERM while a DataLoader forks its workers (utils.iter_loader): raised once the iterator exists,
not lost inside Python's at-fork hooks, and the workers keep the handlers they would have had.

The signal is raised from an ``os.register_at_fork(after_in_parent=...)`` hook, where Python runs logging's
hook too: the window that a real Ctrl-C hits by chance, here hit every time."""
from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
import sys
from typing import List

import pytest
import torch

import utils

_ARMED: List[int] = []  # the signal that the next fork's parent-side hook raises, once


def _raise_armed_signal() -> None:
    if _ARMED:
        signal.raise_signal(_ARMED.pop())


os.register_at_fork(after_in_parent=_raise_armed_signal)


@pytest.fixture(autouse=True)
def disarmed_after():
    """No signal left armed for the next test's forks when a test fails before its fork."""
    yield
    _ARMED.clear()


def forking_loader(dataset) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")


def no_workers_left() -> bool:
    gc.collect()
    return not multiprocessing.active_children()


def test_a_signal_in_an_at_fork_hook_is_lost_by_a_plain_iter(monkeypatch):
    """The bug that iter_loader avoids: the KeyboardInterrupt goes to sys.unraisablehook and iter() returns."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda hook_args: unraisable.append(hook_args.exc_type))
    _ARMED.append(signal.SIGINT)
    iterator = iter(forking_loader(list(range(4))))
    assert unraisable == [KeyboardInterrupt]
    del iterator
    assert no_workers_left()


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, utils.Terminated)])
def test_a_signal_while_workers_fork_is_raised_once_they_all_run(signum, raised, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda hook_args: unraisable.append(hook_args.exc_type))
    loader = forking_loader(list(range(4)))
    forks = []
    monkeypatch.setattr(os, "fork", lambda fork=os.fork: forks.append(1) or fork())
    _ARMED.append(signum)
    with pytest.raises(raised), utils.termination_as_interrupt():
        utils.iter_loader(loader)
    assert not _ARMED and len(forks) == 2 and unraisable == []  # raised after the second worker's fork
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert no_workers_left()


class Handlers(torch.utils.data.Dataset):
    """Item i: whether the worker's SIGINT and SIGTERM handlers are those of the process that made the loader."""

    def __init__(self) -> None:
        self.expected = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([signal.getsignal(s) is h for s, h in zip((signal.SIGINT, signal.SIGTERM), self.expected)])


def test_workers_started_while_signals_wait_get_the_handlers_back():
    with utils.termination_as_interrupt():
        batches = list(utils.iter_loader(forking_loader(Handlers())))
    assert len(batches) == 1 and bool(batches[0].all())
    assert no_workers_left()


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "Interrupted (Ctrl-C): "),
                                                (signal.SIGTERM, 143, "Terminated (SIGTERM): ")])
def test_a_signal_while_an_epoch_starts_its_workers_stops_the_run(signum, code, said, tmp_path, tire_root, dtd_root,
                                                                   monkeypatch, capsys):
    """The auditor's case: Ctrl-C as the second epoch's training loader forks its workers (it used to be lost there:
    the run went on to the end, exit 0, or a worker died and the run failed with a data loading error)."""
    import glass
    from conftest import TINY_NET, copy_class_subset, run_main, tiny_dataset_args

    copy_class_subset(tire_root / "tire", tmp_path / "data" / "tire", n_train=8, n_good=2, n_per_defect=1)
    train_epoch = glass.GLASS._train_discriminator

    def arm_at_epoch_1(self, training_data, epoch, *args, **kwargs):
        if epoch == 1:
            _ARMED.append(signum)
        return train_epoch(self, training_data, epoch, *args, **kwargs)

    monkeypatch.setattr(glass.GLASS, "_train_discriminator", arm_at_epoch_1)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda hook_args: unraisable.append(hook_args.exc_type))
    results = tmp_path / "results"
    data_args = tiny_dataset_args(tmp_path / "data", dtd_root, extra=["--num_workers", "2", "--batch_size", "4"])
    assert run_main(["--gpu", "-1", "--results_path", results, *TINY_NET, "--meta_epochs", "5", *data_args]) == code
    assert not _ARMED and unraisable == []
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(said)
    assert json.loads((results / "run.json").read_text())["status"] == "interrupted"
    assert no_workers_left()
