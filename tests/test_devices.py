"""Device selection without a GPU: the distributed backend follows the chosen device (gloo for --device cpu on a
GPU node, NCCL bound to this process's GPU for CUDA), and RELION's gpu field (``0``, ``0,1``, ``0:1``) becomes one
GPU per process. torch.cuda and torch.distributed are replaced by recorders where a GPU would be needed."""

import os
import subprocess
import sys

import pytest
import starfile
import torch

from cryoforum_plugin import runtime
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.errors import CryoforumError
from relion_external import cryoforum_relion


@pytest.fixture
def calls(monkeypatch):
    """A GPU node seen from a torchrun process (WORLD_SIZE 2, LOCAL_RANK 1) with 4 GPUs; returns the recorded
    set_device / init_process_group calls, in order."""
    log = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: log.append(("set_device", torch.device(dev))))
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group",
                        lambda backend, **kw: log.append(("init_process_group", backend, kw)))
    return log


def test_cpu_device_on_a_gpu_node_uses_gloo(calls):
    runtime.init_from_env("cpu")
    # no GPU touched, no NCCL; a timeout that outlasts rank 0 refining alone while the others wait (torch: 10-30 min)
    assert calls == [("init_process_group", "gloo", {"timeout": runtime.GROUP_TIMEOUT})]
    assert runtime.GROUP_TIMEOUT.total_seconds() >= 12 * 3600


@pytest.mark.parametrize("device", ["cuda", "auto", None])
def test_cuda_sets_this_process_gpu_before_the_group_and_binds_it(calls, device):
    runtime.init_from_env(device)
    gpu = torch.device("cuda", 1)  # LOCAL_RANK
    assert calls == [("set_device", gpu),
                     ("init_process_group", "nccl", {"timeout": runtime.GROUP_TIMEOUT, "device_id": gpu})]


def test_an_explicit_gpu_is_kept_under_torchrun(calls):
    """The RELION job's gpu field gives each process its own cuda:N; LOCAL_RANK must not override it."""
    assert runtime.local_device("cuda:3") == torch.device("cuda", 3)
    runtime.init_from_env("cuda:3")
    assert calls[0] == ("set_device", torch.device("cuda", 3))


def test_single_process_keeps_the_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert runtime.local_rank() is None
    assert runtime.local_device("cpu") == torch.device("cpu")
    assert runtime.init_from_env("cpu") == (0, 1)


@pytest.mark.parametrize("text, local_rank, expected", [
    ("", None, None), ("  ", 0, None), (None, None, None),  # not given: the job's --device decides
    ("0", None, "cuda:0"), ("2", None, "cuda:2"), (" 3 ", 1, "cuda:3"), (1, None, "cuda:1"),
    ("0,1", 0, "cuda:0"), ("0,1", 1, "cuda:1"), ("2:3", 1, "cuda:3"), ("1, 3", 1, "cuda:3"), ("0,1:2,3", 2, "cuda:2"),
])
def test_relion_gpu_field_forms(calls, text, local_rank, expected):
    assert runtime.device_from_relion_gpu(text, local_rank) == expected


@pytest.mark.parametrize("text, local_rank, words", [
    ("0,1", None, ["2 GPUs", "one process uses one GPU", "--gpu 0", "torchrun", "--nproc-per-node=2"]),
    ("0:1", None, ["torchrun"]),
    ("cuda:0", None, ["not a list of GPU ids"]), ("-1", None, ["not a list"]), ("0;1", None, ["not a list"]),
    ("0,1", 2, ["lists 2 GPUs", "torchrun process 2"]),
    ("5", None, ["GPU 5", "4 GPU(s) are visible"]),
])
def test_relion_gpu_field_errors(calls, text, local_rank, words):
    with pytest.raises(CryoforumError) as err:
        runtime.device_from_relion_gpu(text, local_rank)
    message = str(err.value)
    assert "gpu field" in message and all(w in message for w in words), message


def test_relion_gpu_field_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CryoforumError, match=r"gpu field \(--gpu '0'\) asks for a GPU, but no CUDA GPU"):
        runtime.device_from_relion_gpu("0", None)


def _job(tmp_path, *extra):
    return ["--o", str(tmp_path / "job"), "--in_parts", str(tmp_path / "parts.star"), *extra]


def test_relion_job_uses_the_gpu_field(calls, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    args, _ = cryoforum_relion.parse(_job(tmp_path, "--gpu", "1"))
    assert cryoforum_relion.job_options(args).device == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: this process's id of the list
    args, _ = cryoforum_relion.parse(_job(tmp_path, "--gpu", "0:2"))
    assert cryoforum_relion.job_options(args).device == "cuda:2"
    args, _ = cryoforum_relion.parse(_job(tmp_path, "--gpu", "--device", "cpu"))  # empty field: --device decides
    assert cryoforum_relion.job_options(args).device == "cpu"


@pytest.mark.parametrize("gpu, cuda, words", [
    ("0,1", True, ["--gpu '0,1'", "torchrun --standalone --nproc-per-node=2"]),
    ("0", False, ["--gpu '0'", "no CUDA GPU"]),
])
def test_relion_job_gpu_error_is_one_line(monkeypatch, tmp_path, capsys, gpu, cuda, words):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert cryoforum_relion.main(_job(tmp_path, "--gpu", gpu)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cryo-forum error: the gpu field"), err
    assert all(w in err for w in words), err
    assert (tmp_path / "job" / "RELION_JOB_EXIT_FAILURE").exists()


def test_relion_job_under_torchrun(tmp_path):
    """The RELION job as the gpu field's error tells to run it for several GPUs, here on two CPU processes (gloo):
    every rank trains and predicts its block, rank 0 alone refines and writes the outputs, the nodes and the
    success marker."""
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "sim"), "--n", "203", "--box", "32",
                "--snr", "1", "--seed", "8"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "relion_external.cryoforum_relion", "--o", str(tmp_path / "job"), "--in_parts",
           str(tmp_path / "sim" / "particles.star"), "--mode", "train_predict", "--device", "cpu", "--width", "0.125",
           "--epochs", "2", "--batch", "16", "--box", "32", "--preset", "paper", "--test-fraction", "0.2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = tmp_path / "job"
    assert sorted(p.name for p in job.glob("RELION_JOB_EXIT_*")) == ["RELION_JOB_EXIT_SUCCESS"]
    assert proc.stdout.count("[cryo-forum] done in") == 1  # rank 0 only
    assert len(starfile.read(job / "predicted.star")["particles"]) == 203  # both blocks, merged
    assert "confident.star" in (job / "RELION_OUTPUT_NODES.star").read_text()
