"""What the machine lends this process: memory (utils.cgroup_memory_room, common.available_memory) and cores
(utils.cgroup_cpu_limit, utils.usable_cores, and the warning when torch runs more threads), on made-up cgroup trees with known answers and on this machine."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import common
import utils

ROOT = Path(__file__).resolve().parents[1]


def write_files(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def fake_cgroups(tmp_path: Path, proc_cgroup: str) -> tuple[Path, Path]:
    """A made-up /proc/self/cgroup with ``proc_cgroup`` in it, and an empty folder to mount cgroups at."""
    proc = tmp_path / "cgroup"
    proc.write_text(proc_cgroup)
    return proc, tmp_path / "sys"


def test_cgroup_v2_memory_room_is_the_tightest_limit_less_the_working_set(tmp_path):
    """Each level from the process's cgroup up: limit less (usage less inactive file cache); the smallest wins."""
    gib = 2**30
    proc, mount = fake_cgroups(tmp_path, "0::/user.slice/job.scope\n")
    write_files(mount / "user.slice", {"memory.max": f"{8 * gib}\n", "memory.current": f"{3 * gib}\n",
                                       "memory.stat": f"anon {2 * gib}\ninactive_file {gib}\nactive_file 0\n"})
    write_files(mount / "user.slice" / "job.scope", {"memory.max": "max\n", "memory.current": f"{gib}\n"})
    assert utils.cgroup_memory_room(str(proc), str(mount)) == 6 * gib
    write_files(mount / "user.slice" / "job.scope", {"memory.max": f"{5 * gib}\n", "memory.current": f"{2 * gib}\n"})
    assert utils.cgroup_memory_room(str(proc), str(mount)) == 3 * gib
    write_files(mount / "user.slice" / "job.scope", {"memory.max": f"{gib}\n", "memory.current": f"{2 * gib}\n"})
    assert utils.cgroup_memory_room(str(proc), str(mount)) == 0  # over its limit: nothing left


def test_cgroup_v1_memory_room_in_a_container_and_without_limits(tmp_path):
    """cgroup v1 as Docker shows it: the host's path is not visible, the container's cgroup is the mount itself."""
    gib = 2**30
    proc, mount = fake_cgroups(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n")
    write_files(mount / "memory", {"memory.limit_in_bytes": f"{4 * gib}\n", "memory.usage_in_bytes": f"{gib}\n",
                                   "memory.stat": f"cache {gib}\ntotal_inactive_file {gib // 2}\n"})
    assert utils.cgroup_memory_room(str(proc), str(mount)) == 4 * gib - gib // 2
    write_files(mount / "memory", {"memory.limit_in_bytes": "9223372036854771712\n"})  # v1's "no limit"
    assert utils.cgroup_memory_room(str(proc), str(mount)) is None
    assert utils.cgroup_memory_room(str(tmp_path / "absent"), str(mount)) is None


def test_available_memory_is_the_tighter_limit_plus_the_kept_heap(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(utils, "free_heap_bytes", lambda: gib // 4)
    monkeypatch.setattr(common, "system_available_memory", lambda: 20 * gib)
    monkeypatch.setattr(utils, "cgroup_memory_room", lambda: None)
    assert common.available_memory() == 20 * gib + gib // 4
    monkeypatch.setattr(utils, "cgroup_memory_room", lambda: 6 * gib)  # a container on a larger host
    assert common.available_memory() == 6 * gib + gib // 4
    monkeypatch.setattr(common, "system_available_memory", lambda: None)
    monkeypatch.setattr(utils, "free_heap_bytes", lambda: None)
    assert common.available_memory() == 6 * gib
    monkeypatch.setattr(utils, "cgroup_memory_room", lambda: None)
    assert common.available_memory() is None


def test_cgroup_cpu_quota_v2_and_v1(tmp_path):
    proc, mount = fake_cgroups(tmp_path, "0::/machine.slice/box\n")
    write_files(mount / "machine.slice", {"cpu.max": "max 100000\n"})
    write_files(mount / "machine.slice" / "box", {"cpu.max": "150000 100000\n"})  # docker run --cpus 1.5
    assert utils.cgroup_cpu_limit(str(proc), str(mount)) == 1.5
    write_files(mount / "machine.slice" / "box", {"cpu.max": "max 100000\n"})
    assert utils.cgroup_cpu_limit(str(proc), str(mount)) is None
    proc.write_text("3:cpu,cpuacct:/docker/abc\n")  # v1; the host's path is not visible in the container
    write_files(mount / "cpu", {"cpu.cfs_quota_us": "300000\n", "cpu.cfs_period_us": "100000\n"})
    assert utils.cgroup_cpu_limit(str(proc), str(mount)) == 3.0
    write_files(mount / "cpu", {"cpu.cfs_quota_us": "-1\n"})  # v1's "no quota"
    assert utils.cgroup_cpu_limit(str(proc), str(mount)) is None


def test_usable_cores_rounds_a_quota_up_and_never_exceeds_the_affinity(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(utils, "cgroup_cpu_limit", lambda: 0.5)
    assert utils.usable_cores() == 1
    monkeypatch.setattr(utils, "cgroup_cpu_limit", lambda: 1000.0)
    assert utils.usable_cores() == cores
    monkeypatch.setattr(utils, "cgroup_cpu_limit", lambda: None)
    assert utils.usable_cores() == cores


def test_default_workers_follow_the_cpu_affinity():
    """Pinned to one core (as ``taskset -c 0`` does), a process defaults to one DataLoader worker."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "import main; print(main.default_num_workers())")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1"]


def test_more_torch_threads_than_usable_cores_is_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(utils, "usable_cores", lambda: 2)
    with caplog.at_level(logging.WARNING):
        utils.warn_if_threads_exceed_cores(2)
        assert caplog.text == ""
        utils.warn_if_threads_exceed_cores(32)
    assert "torch runs 32 threads but this process can use 2 core(s)" in caplog.text
    assert "OMP_NUM_THREADS=2 is likely faster" in caplog.text
