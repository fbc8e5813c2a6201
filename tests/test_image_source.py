"""Reading particle images at scale: positional reads of every MRC storage mode, bounded memory, loader processes
that give the same batches as the main process and report bad input as one line."""

import mrcfile
import numpy as np
import pytest

from cryoforum_plugin.formats.loader import ImageSource
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import StackReader, stack_shape
from cryoforum_plugin.formats.star import read_star


def _rss_kb() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0])


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.float16, np.int8, np.uint16])
def test_reader_matches_mrcfile_for_every_mode_and_order(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = {}
    for name in ("a", "b"):
        arr = (rng.normal(size=(30, 24, 24)) * 20).astype(dtype)
        path = tmp_path / f"{name}.mrcs"
        with mrcfile.new(str(path)) as mrc:
            mrc.set_data(arr)
            mrc.set_extended_header(np.zeros(7, dtype=[("x", "<i4")]))  # data start after 1024 + 28 bytes
        data[str(path)] = arr
    paths = np.array([str(tmp_path / "a.mrcs"), str(tmp_path / "b.mrcs")] * 20)
    idx = np.r_[np.arange(10, 30), np.array([3, 3, 29, 0, 5, 6, 7, 8, 1, 2, 14, 13, 12, 11, 0, 28, 27, 9, 4, 20])]
    with StackReader(max_open=1) as reader:
        out = reader.read(paths, idx)
    expected = np.stack([data[p][i] for p, i in zip(paths, idx)]).astype(np.float32)
    assert out.dtype == np.float32 and np.array_equal(out, expected)
    assert stack_shape(paths[0]) == (30, 24, 24)


def test_truncated_stack_is_named(tmp_path):
    path = tmp_path / "t.mrcs"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(np.zeros((10, 16, 16), np.float32))
    with open(path, "r+b") as fh:
        fh.truncate(1024 + 4 * 16 * 16 * 6 + 100)
    with pytest.raises(CryoforumError, match=r"t\.mrcs.*announces 10 images, the file holds 6.*Fix:"):
        StackReader().read([str(path)], [0])


def test_reading_a_large_stack_keeps_memory_flat(tmp_path):
    """Reading all of a 150 MB stack in batches must not leave its pages in the process (a memory map would)."""
    n, box = 36000, 32
    path = tmp_path / "big.mrcs"
    with mrcfile.new_mmap(str(path), shape=(n, box, box), mrc_mode=2) as mrc:
        mrc.data[:] = 1.0
    with StackReader() as reader:
        reader.read([str(path)], [0])
        before = _rss_kb()
        total = 0.0
        for lo in range(0, n, 1000):
            total += float(reader.read([str(path)] * 1000, np.arange(lo, lo + 1000)).sum())
        grown_mb = (_rss_kb() - before) / 1024
    assert total == n * box * box
    assert grown_mb < 40, f"RSS grew by {grown_mb:.0f} MB while streaming a {n * box * box * 4 / 2**20:.0f} MB stack"


def test_loader_processes_give_the_main_process_batches(relion_set):
    ps = read_star(relion_set["dir"] / "parts_ctf.star")
    source = ImageSource(ps, cache_bytes=0)  # streamed, as a set larger than the cache would be
    order = np.random.default_rng(1).permutation(len(ps))
    batches = [order[lo:lo + 37] for lo in range(0, len(ps), 37)]
    inline = list(source.batches(order, 37, workers=0))
    ahead = list(source.batches(order, 37, workers=2))
    assert len(inline) == len(ahead) == len(batches)
    for (rows0, img0), (rows2, img2), rows in zip(inline, ahead, batches):
        assert np.array_equal(rows0, rows) and np.array_equal(rows2, rows) and isinstance(rows2, np.ndarray)
        assert img2.dtype == img0.dtype and np.array_equal(img0.numpy(), img2.numpy())
    ref = mrcfile.read(relion_set["dir"] / "parts_ctf.mrcs")
    assert np.array_equal(ahead[0][1].numpy(), ref[batches[0]])


def test_loader_process_error_is_one_line(relion_set, tmp_path):
    ps = read_star(relion_set["dir"] / "parts_ctf.star")
    ps.image_index[5] = 10_000  # past the end of the 400-image stack
    source = ImageSource(ps, cache_bytes=0)
    with pytest.raises(CryoforumError) as err:
        list(source.batches(np.arange(8), 4, workers=2))
    text = str(err.value)
    assert "past the end" in text and "parts_ctf.mrcs" in text and "Traceback" not in text and "\n" not in text
