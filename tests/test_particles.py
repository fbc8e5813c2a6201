"""The particle data layer: STAR 3.0/3.1 and .cs I/O, round trips, image access and bad input."""


import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from cryosparc.dataset import Dataset

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import StackReader
from cryoforum_plugin.formats.cs import read_cs, write_cs
from cryoforum_plugin.formats.star import read_star, write_star

from conftest import DATA


def test_reads_relion_written_star_and_images(relion_set):
    """A STAR and stack written by real relion_project: poses, origins, CTF, optics, images."""
    d = relion_set["dir"]
    ps = read_star(d / "parts_ctf.star")
    assert len(ps) == 400 and ps.source["version"] == "3.1" and int(ps.box[0]) == relion_set["box"]
    assert np.allclose(ps.pixel_size, relion_set["pixel_size"], atol=1e-5)
    # RELION prints angles with ~1e-5 degree precision
    assert rotations.geodesic(ps.quat, relion_set["quat"]).max() < 1e-5
    assert np.allclose(ps.shift_A, relion_set["shift_A"], atol=1e-4)
    assert ps.ctf is not None and np.all(ps.ctf["voltage"] == 300)
    with StackReader(max_open=2) as reader:
        img = reader.read(ps.image_path[[5, 0, 5]], ps.image_index[[5, 0, 5]])
    ref = mrcfile.read(d / "parts_ctf.mrcs")
    assert np.array_equal(img[0], ref[5]) and np.array_equal(img[1], ref[0])


def test_star_cs_star_round_trip_keeps_optics_and_columns(relion_set, tmp_path):
    src = relion_set["dir"] / "parts_ctf.star"
    before = src.read_bytes()
    ps = read_star(src)
    write_cs(ps, tmp_path / "p.cs")
    back = read_cs(tmp_path / "p.cs")
    assert rotations.geodesic(back.quat, ps.quat).max() < 1e-6
    assert np.allclose(back.shift_A, ps.shift_A, atol=1e-4)
    for k in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast"):
        assert np.allclose(back.ctf[k], ps.ctf[k], rtol=1e-6, atol=1e-4), k
    assert (back.image_path == ps.image_path).all() and (back.image_index == ps.image_index).all()
    write_star(back, tmp_path / "p.star", relative_to=tmp_path)
    again = read_star(tmp_path / "p.star")
    assert rotations.geodesic(again.quat, ps.quat).max() < 1e-6
    assert np.allclose(again.shift_A, ps.shift_A, atol=1e-4)
    assert (again.uid == back.uid).all()
    optics = starfile.read(tmp_path / "p.star")["optics"]
    assert float(optics["rlnImagePixelSize"][0]) == pytest.approx(relion_set["pixel_size"], abs=1e-5)
    assert int(optics["rlnImageSize"][0]) == relion_set["box"]
    # star -> star keeps every column and the optics table verbatim
    ps.source["particles"]["rlnMyColumn"] = np.arange(len(ps))
    same = relion_set["dir"] / "same.star"  # beside the original: the names still resolve, so kept verbatim
    write_star(ps, same)
    blocks = starfile.read(same)
    moved = read_star(tmp_path / "p.star")  # written elsewhere: names re-based so they still find the stack
    assert set(moved.image_path) == set(ps.image_path)
    assert list(blocks["optics"].columns) == list(ps.source["optics"].columns)
    assert (blocks["particles"]["rlnMyColumn"] == np.arange(len(ps))).all()
    assert (blocks["particles"]["rlnImageName"] == ps.source["image_names"]).all()
    assert src.read_bytes() == before  # input untouched


def make_cs(tmp_path, n=30, box=32):
    """A complete cryoSPARC-style particles .cs (blob, ctf, alignments3D) in a project layout J5/..."""
    rng = np.random.default_rng(3)
    proj = tmp_path / "P1"
    (proj / "J5" / "extract").mkdir(parents=True)
    stack = rng.normal(size=(n, box, box)).astype(np.float32)
    with mrcfile.new(proj / "J5" / "extract" / "stack.mrc") as m:
        m.set_data(stack)
    from cryoforum_plugin.formats.columns import CS_ALIGN_FIELDS, CS_BLOB_FIELDS, CS_CTF_FIELDS

    ds = Dataset.allocate(n, CS_BLOB_FIELDS + CS_CTF_FIELDS + CS_ALIGN_FIELDS)
    ds["blob/path"] = np.array([">J5/extract/stack.mrc"] * n, dtype=object)
    ds["blob/idx"] = np.arange(n)[::-1]
    ds["blob/shape"] = box
    ds["blob/psize_A"] = 2.1
    ds["ctf/df1_A"] = rng.uniform(8000, 20000, n)
    ds["ctf/df2_A"] = ds["ctf/df1_A"] - 300
    ds["ctf/df_angle_rad"] = rng.uniform(0, np.pi, n)
    ds["ctf/accel_kv"] = 300
    ds["ctf/cs_mm"] = 2.7
    ds["ctf/amp_contrast"] = 0.07
    ds["ctf/exp_group_id"] = rng.integers(0, 2, n)
    ds["alignments3D/pose"] = rotations.quat_to_cryosparc_pose(rotations.random_quats(n, rng))
    ds["alignments3D/shift"] = rng.uniform(-4, 4, (n, 2))
    ds["alignments3D/psize_A"] = 2.1
    ds["alignments3D/split"] = rng.integers(0, 2, n)
    path = proj / "J5" / "particles.cs"
    ds.save(str(path))
    return path, proj, ds, stack


def test_cs_star_cs_round_trip_is_lossless(tmp_path):
    path, proj, ds, stack = make_cs(tmp_path)
    ps = read_cs(path)  # project dir found from the J5/ layout; '>' prefix stripped
    with StackReader() as reader:
        assert np.array_equal(reader.read(ps.image_path[:3], ps.image_index[:3]), stack[ds["blob/idx"][:3]])
    out = tmp_path / "out"
    assert cli(["convert", str(path), str(out / "p.star")]) == 0
    star = read_star(out / "p.star")
    assert set(starfile.read(out / "p.star")["optics"]["rlnOpticsGroup"]) == {1, 2}
    assert cli(["convert", str(out / "p.star"), str(out / "back.cs"), "--project-dir", str(proj)]) == 0
    back = Dataset.load(str(out / "back.cs"))
    assert (back["uid"] == ds["uid"]).all()
    q0 = rotations.cryosparc_pose_to_quat(ds["alignments3D/pose"])
    assert rotations.geodesic(rotations.cryosparc_pose_to_quat(back["alignments3D/pose"]), q0).max() < 1e-6
    assert np.allclose(back["alignments3D/shift"], ds["alignments3D/shift"], atol=1e-5)
    for f in ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast",
              "ctf/exp_group_id", "alignments3D/split", "blob/idx", "blob/psize_A"):
        assert np.allclose(back[f], ds[f], rtol=1e-6, atol=1e-3), f
    assert set(back["blob/path"]) == {"J5/extract/stack.mrc"}
    assert np.array_equal(star.half_set, ds["alignments3D/split"] + 1)
    assert cli(["convert", str(path), str(out / "abs.star"), "--absolute-paths"]) == 0
    names = starfile.read(out / "abs.star")["particles"]["rlnImageName"]
    assert all(n.split("@", 1)[1] == str(proj / "J5" / "extract" / "stack.mrc") for n in names)


def test_relion30_star_with_pixel_origins(tmp_path):
    stack = np.zeros((4, 16, 16), np.float32)
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_data(stack)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1}@s.mrcs" for i in range(4)], "rlnAngleRot": 10.0,
                       "rlnAngleTilt": 20.0, "rlnAnglePsi": 30.0, "rlnOriginX": 2.0, "rlnOriginY": -1.0,
                       "rlnDetectorPixelSize": 5.0, "rlnMagnification": 10000.0, "rlnDefocusU": 1e4,
                       "rlnDefocusV": 1e4, "rlnDefocusAngle": 0.0, "rlnVoltage": 200.0,
                       "rlnSphericalAberration": 2.0, "rlnAmplitudeContrast": 0.1})
    starfile.write(df, tmp_path / "old.star")
    ps = read_star(tmp_path / "old.star")
    assert ps.source["version"] == "3.0" and int(ps.box[0]) == 16
    assert np.allclose(ps.pixel_size, 5.0) and np.allclose(ps.shift_A, [[10.0, -5.0]] * 4)
    write_star(ps, tmp_path / "new.star")
    blocks = starfile.read(tmp_path / "new.star")
    assert "optics" in blocks and float(blocks["optics"]["rlnVoltage"][0]) == 200.0
    assert np.allclose(blocks["particles"]["rlnOriginXAngst"], 10.0)


# ----------------------------------------------------------------------------------------------- bad input


def _star(tmp_path, n=3, box=16, stack_n=3, names=None, **cols):
    with mrcfile.new(tmp_path / "s.mrcs", overwrite=True) as m:
        m.set_data(np.zeros((stack_n, box, box), np.float32))
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0], "rlnImageSize": [box]})
    parts = pd.DataFrame({"rlnImageName": names or [f"{i + 1}@s.mrcs" for i in range(n)], "rlnOpticsGroup": 1,
                          "rlnAngleRot": 1.0, "rlnAngleTilt": 2.0, "rlnAnglePsi": 3.0, **cols})
    starfile.write({"optics": optics, "particles": parts}, tmp_path / "p.star")
    return tmp_path / "p.star"


def test_missing_stack_names_file_row_and_fix(tmp_path):
    path = _star(tmp_path, names=["1@s.mrcs", "2@missing.mrcs", "3@s.mrcs"])
    with pytest.raises(CryoforumError) as e:
        read_star(path).validate_images()
    assert "missing.mrcs" in str(e.value) and "row 2" in str(e.value) and "Fix:" in str(e.value)


def test_index_past_end_of_stack(tmp_path):
    path = _star(tmp_path, n=3, stack_n=2)
    with pytest.raises(CryoforumError, match=r"row 3.*image 3 requested.*holds 2 images"):
        read_star(path).validate_images()
    with pytest.raises(CryoforumError, match="past the end"):
        ps = read_star(path)
        StackReader().read(ps.image_path, ps.image_index)


def test_star_without_image_names(tmp_path):
    with pytest.raises(CryoforumError, match="rlnImageName"):
        read_star(DATA / "postprocess.star")
    with pytest.raises(CryoforumError, match="rlnImageName"):
        read_star(DATA / "run_it025_optimiser_3D.star")


def test_nan_pose_and_mixed_boxes(tmp_path):
    path = _star(tmp_path, rlnAngleTilt=[1.0, np.nan, 2.0])
    with pytest.raises(CryoforumError, match=r"row 2.*NaN"):
        read_star(path)
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnImagePixelSize": [2.0, 2.0], "rlnImageSize": [16, 24]})
    parts = pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"], "rlnOpticsGroup": [1, 2]})
    starfile.write({"optics": optics, "particles": parts}, tmp_path / "mixed.star")
    with pytest.raises(CryoforumError, match=r"row 2.*mixed box sizes"):
        read_star(tmp_path / "mixed.star")


def test_cs_without_blob_fields_real_schema():
    """cryoSPARC's own alignment output has no blob slot: a clear error, not a KeyError."""
    with pytest.raises(CryoforumError, match="blob/path.*no particle images") as e:
        read_cs(DATA / "schema_0rows.cs")
    assert "Fix:" in str(e.value)


def test_cli_prints_one_line_error_and_exit_2(tmp_path, capsys):
    assert cli(["info", str(tmp_path / "nope.star")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.star" in err and "Traceback" not in err


def test_info_summarises(relion_set, capsys):
    assert cli(["info", str(relion_set["dir"] / "parts_ctf.star"), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["particles"] == 400 and info["with_pose"] == 400 and info["star_version"] == "3.1"
    assert info["poses"]["direction_coverage_ratio"] > 0.3  # random poses cover the sphere


def test_writes_are_atomic_and_never_touch_input(tmp_path, monkeypatch):
    path, proj, ds, _ = make_cs(tmp_path)
    ps = read_cs(path)
    target = tmp_path / "out.star"
    target.write_text("previous")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(starfile, "write", boom)
    with pytest.raises(RuntimeError):
        write_star(ps, target)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.star")] == []


def _with_typed_fields(ps, seed=0):
    """``ps`` with every typed per-particle field set (values exact in float32 and in STAR's %.6f)."""
    import dataclasses

    rng = np.random.default_rng(seed)
    n = len(ps)
    prior = rotations.random_quats(n, rng)
    prior[::7] = np.nan  # rows without a prior pose
    predicted = rotations.random_quats(n, rng)
    predicted[1::5] = np.nan
    return dataclasses.replace(
        ps, uncertainty={"max": -rng.integers(1, 400, n) / 4.0, "trace": -rng.integers(1, 4000, n) / 4.0},
        fom=rng.integers(0, 64, n) / 64.0, junk=rng.integers(0, 4, n).astype(np.int64), prior_quat=prior,
        predicted_quat=predicted)


def _assert_typed_equal(a, b, prior_tol=1e-5):
    for k in ("max", "trace"):
        assert np.array_equal(a.uncertainty[k], b.uncertainty[k]), k
    assert np.array_equal(a.fom, b.fom) and np.array_equal(a.junk, b.junk)
    for name in ("prior_quat", "predicted_quat"):
        qa, qb = getattr(a, name), getattr(b, name)
        known = np.isfinite(qa).all(axis=1)
        assert np.array_equal(known, np.isfinite(qb).all(axis=1)), name
        assert rotations.geodesic(qa[known], qb[known]).max() < prior_tol, name


def test_typed_fields_survive_star_cs_star_and_subset(tmp_path):
    """Uncertainty, figure of merit, junk label and prior pose are read by both readers, written by both writers
    (STAR columns / cryoforum/* .cs fields), survive STAR -> .cs -> STAR, and are sliced by subset()."""
    from cryoforum_plugin.formats.columns import FOM_COLUMN, JUNK_COLUMN, PREDICTED_ANGLE_COLUMNS, PRIOR_ANGLE_COLUMNS

    path, proj, ds, _ = make_cs(tmp_path)
    ps = _with_typed_fields(read_cs(path))
    assert ps.file_format == "cs" and ps.star_version is None and "alignments3D/error" in ps.numeric
    write_star(ps, tmp_path / "a.star")
    table = starfile.read(tmp_path / "a.star")["particles"]
    for column in (*PRIOR_ANGLE_COLUMNS, *PREDICTED_ANGLE_COLUMNS, "rlnCryoforumMaxDispersion",
                   "rlnCryoforumTraceDispersion", FOM_COLUMN, JUNK_COLUMN):
        assert column in table, column
    star = read_star(tmp_path / "a.star")
    assert star.file_format == "star" and star.star_version == "3.1"
    _assert_typed_equal(ps, star)
    write_cs(star, tmp_path / "b.cs")
    assert {"cryoforum/max_dispersion", "cryoforum/trace_dispersion", "cryoforum/fom", "cryoforum/junk",
            "cryoforum/prior_pose", "cryoforum/predicted_pose"} <= set(Dataset.load(str(tmp_path / "b.cs")).fields())
    cs = read_cs(tmp_path / "b.cs")
    _assert_typed_equal(ps, cs)
    write_star(cs, tmp_path / "c.star")
    again = read_star(tmp_path / "c.star")
    _assert_typed_equal(ps, again)
    # .cs -> .cs keeps the typed fields and the other numeric fields
    write_cs(cs, tmp_path / "d.cs")
    d = read_cs(tmp_path / "d.cs")
    _assert_typed_equal(ps, d)
    assert np.array_equal(d.numeric["alignments3D/error"], ds["alignments3D/error"])
    # other numeric STAR columns are in ``numeric`` and found by column(), typed ones by either name
    star.source["particles"]["rlnClassNumber"] = np.arange(len(star)) % 3 + 1
    write_star(star, tmp_path / "e.star")
    e = read_star(tmp_path / "e.star")
    assert np.array_equal(e.column("rlnClassNumber"), np.arange(len(e)) % 3 + 1)
    assert e.column(FOM_COLUMN) is e.fom and np.array_equal(cs.column(FOM_COLUMN), cs.column("cryoforum/fom"))
    assert e.column("rlnNoSuchColumn") is None
    # subset slices every typed field and numeric column
    rows = np.array([5, 0, 3])
    sub = again.subset(rows)
    assert np.array_equal(sub.fom, again.fom[rows]) and np.array_equal(sub.junk, again.junk[rows])
    assert np.array_equal(sub.uncertainty["trace"], again.uncertainty["trace"][rows])
    assert np.array_equal(sub.prior_quat, again.prior_quat[rows], equal_nan=True)
    assert np.array_equal(sub.predicted_quat, again.predicted_quat[rows], equal_nan=True)
    mask = np.arange(len(d)) % 2 == 0
    assert np.array_equal(d.subset(mask).numeric["alignments3D/error"], ds["alignments3D/error"][mask])
    # a typed field set to None drops its column / field
    import dataclasses

    write_star(dataclasses.replace(again, junk=None), tmp_path / "f.star")
    assert JUNK_COLUMN not in starfile.read(tmp_path / "f.star")["particles"]
    write_cs(dataclasses.replace(cs, junk=None), tmp_path / "f.cs")
    assert "cryoforum/junk" not in Dataset.load(str(tmp_path / "f.cs")).fields()


def test_extra_columns_set_typed_fields(tmp_path):
    """``extra`` (STAR column -> values, as prediction and simulation use it) still works: the typed columns in it
    set the typed fields, which are what the writers write."""
    import dataclasses

    from cryoforum_plugin.formats.columns import FOM_COLUMN, JUNK_COLUMN, PRIOR_ANGLE_COLUMNS

    path, proj, ds, _ = make_cs(tmp_path)
    ps = read_cs(path)
    n = len(ps)
    angles = rotations.quat_to_relion_euler(ps.quat)
    extra = {FOM_COLUMN: np.linspace(0, 1, n), JUNK_COLUMN: np.arange(n) % 2, "rlnMyExtra": np.arange(n) * 2.0,
             **{c: angles[:, i] for i, c in enumerate(PRIOR_ANGLE_COLUMNS)}}
    out = dataclasses.replace(ps, extra=extra)
    assert np.array_equal(out.fom, extra[FOM_COLUMN]) and np.array_equal(out.junk, extra[JUNK_COLUMN])
    assert rotations.geodesic(out.prior_quat, ps.quat).max() < 1e-6
    out.fom = out.fom[::-1].copy()  # the typed field wins over extra's copy
    write_star(out, tmp_path / "x.star")
    table = starfile.read(tmp_path / "x.star")["particles"]
    assert np.allclose(table[FOM_COLUMN], extra[FOM_COLUMN][::-1], atol=1e-6)
    assert np.array_equal(table["rlnMyExtra"], extra["rlnMyExtra"])
    assert np.array_equal(out.subset([1, 2]).fom, out.fom[[1, 2]])


def test_one_half_set_assignment_keyed_by_uid(tmp_path):
    """Gold standard: particles without a half-set get one from their uid alone (the same in any subset or order,
    balanced), the input's half-sets are kept, and a set takes the half-sets of the same particles in another set
    (the training set of a job) before hashing; reconstruction and refinement use this one function."""
    import dataclasses

    from cryoforum_plugin.formats.particles import half_sets, uid_half_sets

    path, proj, ds, _ = make_cs(tmp_path)
    ps = read_cs(path)
    n = len(ps)
    uids = np.arange(1, 20001, dtype=np.uint64)  # consecutive uids, as a simple importer might number them
    halves = uid_half_sets(uids)
    assert set(np.unique(halves)) == {1, 2} and abs((halves == 1).mean() - 0.5) < 0.02
    assert np.array_equal(uid_half_sets(uids[::-1]), halves[::-1])  # no dependence on order or neighbours
    assert np.array_equal(uid_half_sets(uids[5000:7000]), halves[5000:7000])
    free = dataclasses.replace(ps, half_set=np.zeros(n, np.int64))
    assigned = free.with_half_sets()
    assert np.array_equal(assigned.half_set, uid_half_sets(ps.uid))
    assert np.array_equal(half_sets(free), assigned.half_set)
    rows = np.array([7, 3, 11, 0])
    assert np.array_equal(free.subset(rows).with_half_sets().half_set, assigned.half_set[rows])
    assert np.array_equal(ps.with_half_sets().half_set, ds["alignments3D/split"] + 1)  # the input's are kept
    mixed = dataclasses.replace(ps, half_set=np.where(np.arange(n) % 2 == 0, 0, ps.half_set))
    like = dataclasses.replace(ps, half_set=3 - ps.half_set)  # the other set knows the even rows' half-sets
    got = mixed.with_half_sets(like=like.subset(np.arange(0, n, 4))).half_set
    rows = np.arange(n)
    assert np.array_equal(got[rows % 2 == 1], ps.half_set[rows % 2 == 1])  # own half-sets win
    assert np.array_equal(got[rows % 4 == 0], 3 - ps.half_set[rows % 4 == 0])  # from ``like`` by uid
    assert np.array_equal(got[rows % 4 == 2], uid_half_sets(ps.uid[rows % 4 == 2]))  # else by uid
