"""``cryoforum watch`` and the RELION External job on a growing STAR: every particle processed exactly once, through
kills, restarts and files that grow; one watcher per output directory (tests/conftest's pre-trained model, 32 px)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.formats.mrc import write_mrc
from cryoforum_plugin.formats.star import read_star, write_star
from cryoforum_plugin.infer.metrics import geodesic_errors
from cryoforum_plugin.physics.resample import resized_map
from cryoforum_plugin.pipeline import options as pipeline_options
from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.pipeline.ledger import Ledger, StreamLock
from cryoforum_plugin.pipeline.stream import ParticleFiles
from cryoforum_plugin.pipeline.watch import Watcher, WatchSettings

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--threads", "1", "--settle", "0.3", "--poll", "0.1"]


@pytest.fixture(scope="module")
def stream_set(tmp_path_factory):
    """240 new particles of the default map (32 px, SNR 10, shifts up to 2 px, a seed the model never saw) and the
    map at 32 px as the reference: {'ps', 'map'}."""
    from cryoforum_plugin.sim.dataset import simulate

    d = tmp_path_factory.mktemp("stream_set")
    simulate(DEFAULT_MAP, d / "sim", n=240, box=32, snr=10.0, max_shift=2.0, seed=11, progress=False)
    vol, apix = resized_map(DEFAULT_MAP, 32)
    write_mrc(d / "ref32.mrc", vol.numpy(), apix)
    return {"ps": read_star(d / "sim" / "particles.star"), "map": d / "ref32.mrc"}


def drop_batch(ps, rows, directory: Path, name: str) -> Path:
    """Hand a batch over as a facility script should: write it under a hidden name, then rename it in."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}"
    write_star(ps.subset(rows), tmp, relative_to=directory.resolve())
    os.replace(tmp, directory / name)
    return directory / name


def watch_cmd(model, ref, src, out, *extra):
    return [sys.executable, "-m", "cryoforum_plugin.cli", "watch", "--model", str(model), "--reference", str(ref),
            "--in", str(src), "--out", str(out), *FAST, *extra]


def check_exactly_once(out: Path, truth, max_median_deg: float = 5.0):
    """Every particle of ``truth`` once in refined.star (and predicted.star), at a pose near its true one;
    confident + rejected partition them. Returns the refined set."""
    refined, predicted = read_star(out / "refined.star"), read_star(out / "predicted.star")
    confident, rejected = read_star(out / "confident.star"), read_star(out / "rejected.star")
    for part in (refined, predicted):
        assert len(part) == len(truth) and sorted(part.uid) == sorted(truth.uid)
    assert not set(confident.uid) & set(rejected.uid)
    assert sorted(np.concatenate([confident.uid, rejected.uid])) == sorted(truth.uid)
    order = {u: i for i, u in enumerate(truth.uid)}
    rows = np.array([order[u] for u in refined.uid])
    err = np.degrees(geodesic_errors(refined.quat, truth.quat[rows]))
    assert np.median(err) < max_median_deg, np.median(err)
    return refined


def wait_for(predicate, timeout: float, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.1)
    return False


def batches_done(out: Path) -> int:
    ledger = out / "watch_state" / "ledger.json"
    return len(json.loads(ledger.read_text())["batches"]) if ledger.exists() else 0


def test_directory_stream_survives_sigkill_and_restart(pretrained_from_map, stream_set, tmp_path):
    """Batches appear in a directory; the watcher is killed with SIGKILL while it works, restarted with the same
    command, and ends idle: every particle once in every output, poses refined to the truth, the map written."""
    ps, incoming, out = stream_set["ps"], tmp_path / "incoming", tmp_path / "out"
    chunks = np.array_split(np.arange(len(ps)), 6)
    for i in range(3):
        drop_batch(ps, chunks[i], incoming, f"b{i}.star")
    cmd = watch_cmd(pretrained_from_map["model"], stream_set["map"], incoming, out, "--batch-size", "30",
                    "--map-every", "60")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_for(lambda: batches_done(out) >= 2, 600, proc), (tmp_path / "first.log").read_text()[-3000:]
            for i in range(3, 6):
                drop_batch(ps, chunks[i], incoming, f"b{i}.star")
            os.kill(proc.pid, signal.SIGKILL)  # in the middle of the stream: files left, a batch in flight
            proc.wait()
        finally:
            proc.kill()
    done = batches_done(out)
    assert 2 <= done < 8
    committed = sum(len(np.load(out / "watch_state" / "batches" / f"{b:06d}" / "keys.npy"))
                    for b in json.loads((out / "watch_state" / "ledger.json").read_text())["batches"])
    assert len(read_star(out / "refined.star")) >= committed  # a kill leaves whole files that RELION can read
    log = subprocess.run(cmd + ["--until-idle", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert log.returncode == 0, log.stdout[-3000:] + log.stderr[-3000:]
    assert "resuming" in log.stdout
    check_exactly_once(out, ps)
    status = json.loads((out / "status.json").read_text())
    assert status["particles_done"] == len(ps) and status["confident"] + status["rejected"] == len(ps)
    assert status["resolution_A"] is not None and status["map_particles"] == status["confident"]
    assert "fits" in status["domain_check"]  # the last batch's domain check, also beside predicted.star:
    assert json.loads((out / "predict.json").read_text())["domain_check"] == status["domain_check"]
    assert (out / "confident_map.mrc").exists() and (out / "confident_map_half2.mrc").exists()
    assert not list((out / "watch_state" / "batches").glob("*.part"))


def _watcher(model, ref, src, out, **opts):
    """A watcher that takes what ``src`` holds now, 40 particles a batch, and stops (the RELION job's way)."""
    settings = WatchSettings(batch_size=40, settle=0.0, poll=0.05, until_idle=0.0, map_every=0)
    source = ParticleFiles(src, batch_size=settings.batch_size, settle=0.0)
    return Watcher(source, out, model, steps.Reference.from_files(ref), pipeline_options.options(
        device="cpu", threads=1, **opts), settings)


def test_a_kill_between_the_outputs_and_the_ledger_is_harmless(pretrained_from_map, stream_set, tmp_path,
                                                                monkeypatch):
    """The outputs of a batch are rebuilt before the ledger is written: a crash between the two leaves outputs
    with the batch and a ledger without it; the restart rebuilds the outputs and processes the batch again."""
    ps, src, out = stream_set["ps"].subset(np.arange(80)), tmp_path / "in", tmp_path / "out"
    drop_batch(ps, np.arange(80), src, "all.star")
    model, ref = pretrained_from_map["model"], stream_set["map"]

    calls = []
    real_commit = Ledger.commit

    def crash_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # the outputs of batch 2 are written, its commit is not
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "commit", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _watcher(model, ref, src, out).run()
    assert len(read_star(out / "refined.star")) == 80 and batches_done(out) == 1
    monkeypatch.setattr(Ledger, "commit", real_commit)
    status = _watcher(model, ref, src, out).run()
    assert status["particles_done"] == 80 and status["this_run"]["particles"] == 40
    check_exactly_once(out, ps)


def test_one_star_file_that_grows_in_place(pretrained_from_map, stream_set, tmp_path):
    """RELION rewrites its particles STAR with more rows: each run takes only the new ones; a half-written
    rewrite (no final newline yet) is left alone until it is complete."""
    ps = stream_set["ps"].subset(np.arange(90))
    star, out = tmp_path / "particles.star", tmp_path / "out"
    model, ref = pretrained_from_map["model"], stream_set["map"]
    write_star(ps.subset(np.arange(50)), star, relative_to=tmp_path)
    first = _watcher(model, ref, star, out).run()
    assert first["particles_done"] == 50
    text = (tmp_path / "full.star")
    write_star(ps, text, relative_to=tmp_path)
    star.write_bytes(text.read_bytes()[:-40])  # the writer is halfway through the file
    old = time.time() - 60
    os.utime(star, (old, old))
    files = ParticleFiles(star, settle=1.0)
    assert files.next_batch(lambda keys: np.zeros(len(keys), bool)) is None and files.waiting == [star]
    star.write_bytes(text.read_bytes())  # rewritten in place with 40 more rows
    second = _watcher(model, ref, star, out).run()
    assert second["this_run"]["particles"] == 40 and second["particles_done"] == 90
    check_exactly_once(out, ps)


def test_a_second_watcher_is_refused_and_a_dead_ones_lock_taken_over(stream_set, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from cryoforum_plugin.pipeline.ledger import StreamLock; "
        "StreamLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(3600)"),
        str(out / "watch_state" / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CryoforumError, match=f"another cryo-forum watcher.*pid {holder.pid}"):
            StreamLock(out / "watch_state" / "lock").acquire()
        r = subprocess.run(watch_cmd(tmp_path / "model", stream_set["map"], tmp_path, out, "--until-idle", "5"),
                           capture_output=True, text=True, timeout=600)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2 and "another cryo-forum watcher" in r.stderr and "Fix:" in r.stderr
    assert "Traceback" not in r.stderr
    lock = StreamLock(out / "watch_state" / "lock")  # its holder died (kill -9): the lock is free again
    lock.acquire()
    assert f"pid {os.getpid()} on" in (out / "watch_state" / "lock").read_text()
    lock.release()
    # without flock (some NFS mounts) the pid in the file decides: a dead holder's lock is taken over
    from cryoforum_plugin.pipeline.ledger import _alive

    host = socket.gethostname()
    assert _alive(f"pid {os.getpid()} on {host}") and not _alive(f"pid {holder.pid} on {host}") and not _alive("")


def test_until_idle_exits_zero_and_unreadable_files_are_reported(stream_set, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "notes.star").write_text("data_\n\nloop_\n_rlnMicrographName #1\nmic1.mrc\n")
    start = time.time()
    r = subprocess.run(watch_cmd(tmp_path / "model", stream_set["map"], src, out, "--until-idle", "1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert time.time() - start < 120
    assert "WARNING: skipping" in r.stdout and "rlnImageName" in r.stdout
    status = json.loads((out / "status.json").read_text())
    assert status["particles_done"] == 0 and str(src / "notes.star") in status["problems"]


def test_sigterm_ends_the_watcher_cleanly(stream_set, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    proc = subprocess.Popen(watch_cmd(tmp_path / "model", stream_set["map"], src, out), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (out / "status.json").exists(), 300, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "SIGTERM" in stdout and "0 particles in 0 batches" in stdout


@pytest.mark.relion
def test_relion_external_job_twice_on_a_growing_star(relion, pretrained_from_map, stream_set, tmp_path):
    """The External job in predict mode, run by real relion_pipeliner on a particles STAR, then run again after
    the STAR grew (as RELION's Continue or a schedule step runs it): the second run processes only the new rows;
    the outputs hold every particle once and stay registered nodes; relion_reconstruct reads them."""
    from conftest import run_relion

    ps, proj = stream_set["ps"].subset(np.arange(90)), tmp_path / "proj"
    proj.mkdir()
    shutil.copy(stream_set["map"], proj / "ref.mrc")
    (proj / "default_pipeline.star").write_text(
        "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n \n")
    write_star(ps.subset(np.arange(50)), proj / "particles.star", relative_to=proj)
    exe = Path(sys.executable).with_name("cryoforum-relion")
    opts = (f"fn_exe == {exe};in_part == particles.star;in_3dref == ref.mrc;param1_label == mode;"
            f"param1_value == Predict;param2_label == model;param2_value == {pretrained_from_map['model']};"
            "param3_label == reconstruct;param3_value == yes;nr_threads == 1;other_args == --device cpu")
    run_relion(["relion_pipeliner", "--addJob", "External", "--addJobOptions", opts], cwd=proj)
    job = proj / "External" / "job001"
    run_relion(["relion_pipeliner", "--RunJobs", "External/job001/", "--sec_wait_after", "1"], cwd=proj)
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), (job / "run.err").read_text()
    assert len(read_star(job / "refined.star")) == 50
    write_star(ps, proj / "particles.star", relative_to=proj)  # the STAR grew by 40 rows
    run_relion(["relion_pipeliner", "--RunJobs", "External/job001/", "--sec_wait_after", "1"], cwd=proj)
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), (job / "run.err").read_text()
    assert "40 new particles; 90 processed" in (job / "run.out").read_text()
    check_exactly_once(job, ps)
    pipeline = starfile.read(proj / "default_pipeline.star", always_dict=True)
    nodes = set(pipeline["pipeline_nodes"]["rlnPipeLineNodeName"])
    assert {f"External/job001/{n}" for n in ("refined.star", "confident.star", "confident_map.mrc")} <= nodes
    run_relion(["relion_reconstruct", "--i", "External/job001/refined.star", "--o", "rec.mrc", "--ctf"], cwd=proj)
    assert (proj / "rec.mrc").stat().st_size > 32**3 * 4


def test_the_relion_job_ignores_what_schedulers_add(tmp_path):
    """Arguments a scheduler or another RELION version adds are reported and ignored; a choice typed in another
    case, or left empty, still parses (RELION issue #1108: External jobs inside Schemes)."""
    sys.path.insert(0, str(ROOT))
    from relion_external.cryoforum_relion import parse

    args, unknown = parse(["--o", "External/job004/", "--in_parts", "p.star", "--mode", " Predict", "--model", "m",
                           "--continue", "--in_mics", "mics.star", "--pipeline_control", "External/job004/",
                           "--epochs", "--j", "2"])
    assert args.mode == "predict" and args.model == "m" and args.j == 2 and args.epochs is None
    assert unknown == ["--continue", "--in_mics", "mics.star"]


def test_the_relion_job_fails_on_an_input_it_cannot_use(tmp_path):
    """A watcher goes on past a file it cannot read; the RELION job, whose input is that one file, fails."""
    (tmp_path / "mics.star").write_text("data_\n\nloop_\n_rlnMicrographName #1\nmic1.mrc\n")
    exe = Path(sys.executable).with_name("cryoforum-relion")
    r = subprocess.run([str(exe), "--o", "External/job002/", "--in_parts", "mics.star", "--mode", "predict", "--model",
                        "External/job001/model"], cwd=tmp_path, capture_output=True, text=True)
    assert (tmp_path / "External" / "job002" / "RELION_JOB_EXIT_FAILURE").exists()
    assert "rlnImageName" in r.stderr and "Fix:" in r.stderr and "Traceback" not in r.stderr


def test_output_merge_keeps_one_layout_and_costs_what_the_file_holds(tmp_path):
    """Batches with different optics tables merge into one STAR whose groups are numbered once; a batch without
    a column the stream has is one clear error; the merged file reads back row for row."""
    from cryoforum_plugin.formats.stream_files import StarLayout, merge_star, write_batch_star
    from cryoforum_plugin.sim.dataset import simulate

    simulate(DEFAULT_MAP, tmp_path / "sim", n=30, box=32, snr=1.0, seed=2, progress=False)
    ps = read_star(tmp_path / "sim" / "particles.star")
    a, b = ps.subset(np.arange(10)), ps.subset(np.arange(10, 30))
    b.source["optics"] = b.source["optics"].assign(rlnVoltage=200.0)  # a second microscope setting
    layout = StarLayout()
    layout, _ = write_batch_star(a, tmp_path / "a.star", tmp_path, layout)
    layout, _ = write_batch_star(b, tmp_path / "b.star", tmp_path, layout)
    assert merge_star([tmp_path / "a.star", tmp_path / "b.star"], tmp_path / "m.star") == 30
    merged = starfile.read(tmp_path / "m.star", always_dict=True)
    assert list(merged["optics"]["rlnVoltage"]) == [300.0, 200.0]
    assert list(merged["particles"]["rlnOpticsGroup"]) == [1] * 10 + [2] * 20
    back = read_particles(tmp_path / "m.star")
    assert list(back.uid) == list(ps.uid) and np.degrees(geodesic_errors(back.quat, ps.quat)).max() < 1e-3
    c = ps.subset(np.arange(5))
    c.source["particles"] = c.source["particles"].drop(columns=["rlnDefocusAngle"])
    c.ctf = None
    with pytest.raises(CryoforumError, match="c.star: these particles have no column"):
        write_batch_star(c, tmp_path / "c.star", tmp_path, layout, source="c.star")



def test_cs_merge_writes_what_append_many_writes(tmp_path):
    """Batch .cs files with blob paths of five lengths, one batch with an extra field and one empty, merge into the
    bytes ``Dataset.append_many(...).save()`` writes (the common fields, each string as wide as the widest), which
    cryosparc-tools and formats/cs.py read back row for row."""
    from cryosparc.dataset import Dataset

    from cryoforum_plugin.formats.cs import read_cs
    from cryoforum_plugin.formats.stream_files import merge_cs, write_batch_cs
    from cryoforum_plugin.sim.dataset import simulate

    simulate(DEFAULT_MAP, tmp_path / "sim", n=40, box=32, snr=1.0, seed=3, progress=False)
    ps = read_star(tmp_path / "sim" / "particles.star")
    stack = Path(ps.image_path[0])
    parts, links = [], []
    for k, (lo, hi) in enumerate([(0, 8), (8, 20), (20, 20), (20, 31), (31, 40)]):
        batch = ps.subset(np.arange(lo, hi))
        links.append(stack.with_name("s" * (1 + 7 * k) + ".mrcs"))
        links[-1].symlink_to(stack)
        batch.image_path = np.array([str(links[-1])] * len(batch), dtype=object)
        if k == 1:
            batch.numeric["cryoforum/extra"] = np.arange(len(batch), dtype=np.float64)
        parts.append(tmp_path / f"{k}.cs")
        write_batch_cs(batch, parts[-1], tmp_path)
    widths = {np.load(p, mmap_mode="r").dtype["blob/path"].itemsize for p in parts}
    assert len(widths) == 5  # the case to merge: one string width per batch
    expected = Dataset.append_many(*(Dataset.load(str(p)) for p in parts))
    expected.save(str(tmp_path / "expected.cs"))

    assert merge_cs(parts, tmp_path / "merged.cs") == 40
    assert (tmp_path / "merged.cs").read_bytes() == (tmp_path / "expected.cs").read_bytes()
    merged = Dataset.load(str(tmp_path / "merged.cs"))
    assert merged == expected and "cryoforum/extra" not in merged.fields()
    back = read_cs(tmp_path / "merged.cs")
    assert list(back.uid) == list(ps.uid)
    assert [Path(p).name for p in back.image_path] == [links[k].name for k, n in enumerate([8, 12, 0, 11, 9])
                                                       for _ in range(n)]
    assert np.degrees(geodesic_errors(back.quat, ps.quat)).max() < 1e-3
    (tmp_path / "cut.cs").write_bytes(parts[1].read_bytes()[:-3])
    with pytest.raises(CryoforumError, match="cut.cs: cannot read this batch .cs file .*truncated"):
        merge_cs([parts[0], tmp_path / "cut.cs"], tmp_path / "merged.cs")
    assert Dataset.load(str(tmp_path / "merged.cs")) == expected  # the merged file is untouched


def test_cs_merge_holds_one_batch_in_memory_not_the_stream(tmp_path):
    """20 batch .cs files of 20,000 rows merge with a peak of traced memory (numpy's buffers are traced) under 3
    batches' bytes: the rows are streamed, not loaded (loading them all is 20 batches' bytes and more)."""
    import tracemalloc

    from cryosparc.dataset import Dataset

    from cryoforum_plugin.formats.stream_files import merge_cs

    rows, batches = 20_000, 20
    ds = Dataset.allocate(rows, [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                                 ("alignments3D/pose", "<f4", (3,)), ("ctf/df1_A", "<f4")])
    ds["blob/idx"] = np.arange(rows)
    parts = []
    for b in range(batches):
        ds["uid"] = np.arange(rows, dtype=np.uint64) + b * rows
        ds["blob/path"] = np.array([f"J5/extract/{'m' * (b % 7)}_{i % 50}.mrc" for i in range(rows)], dtype=object)
        parts.append(tmp_path / f"{b:02d}.cs")
        ds.save(str(parts[-1]))
    batch_bytes = max(p.stat().st_size for p in parts)
    tracemalloc.start()
    try:
        assert merge_cs(parts, tmp_path / "merged.cs") == rows * batches
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * batch_bytes, (peak, batch_bytes)
    merged = np.load(tmp_path / "merged.cs", mmap_mode="r")
    assert merged.shape == (rows * batches,) and merged["uid"][-1] == rows * batches - 1
