"""Tests for backmatch_exact.data: the shipped subset, IDX and CIFAR readers,
the restricted unpickler, augmentation and batching.

All non-shipped data is synthesized in tmp_path, a few images per file.
"""

from __future__ import annotations

import builtins
import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from backmatch_exact import data
from backmatch_exact.data import shipped

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def unnormalize(ds: data.Dataset, x: torch.Tensor) -> np.ndarray:
    """Back to 0..255 pixel values (rounded), as numpy uint8."""
    m = torch.tensor(ds.mean).view(1, -1, 1, 1)
    s = torch.tensor(ds.std).view(1, -1, 1, 1)
    return torch.round((x * s + m) * 255).to(torch.uint8).numpy()


def idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.tobytes()


def write_idx_folder(folder, rng, gz=False, n_train=7, n_test=3, classes=3, hw=(28, 28)):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % classes).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % classes).astype(np.uint8),
    }
    for name, arr in arrays.items():
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(idx_bytes(arr))
        else:
            (folder / name).write_bytes(idx_bytes(arr))
    return arrays


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote the official CIFAR
    files: byte strings as (SHORT_)BINSTRING, arrays via
    numpy.core.multiarray._reconstruct with a raw-bytes state."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, obj.tobytes())
            return (_reconstruct, (np.ndarray, (0,), b"b"), state)
        if isinstance(obj, np.dtype):
            return (np.dtype, (obj.str[1:].encode(), 0, 1),
                    (3, b"|", None, None, None, -1, -1, 0))
        return NotImplemented


def dump_pickle(obj, style: str) -> bytes:
    if style == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        # Python 2 numpy named the module numpy.core.multiarray
        return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return pickle.dumps(obj, protocol=int(style))


def cifar_images(rng, n):
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar(folder, which, fmt, rng, per_file=2, style="py2"):
    """Write a miniature CIFAR-`which` in `fmt` ('bin' or 'py') into the
    standard sub-folder of `folder`.  Returns (x_train, y_train, x_test, y_test)."""
    sub = {(10, "bin"): "cifar-10-batches-bin", (10, "py"): "cifar-10-batches-py",
           (100, "bin"): "cifar-100-binary", (100, "py"): "cifar-100-python"}[(which, fmt)]
    d = folder / sub
    d.mkdir(parents=True)
    if which == 10:
        names_train = [f"data_batch_{i}" for i in range(1, 6)]
        names_test = ["test_batch"]
    else:
        names_train, names_test = ["train"], ["test"]
    out = {}
    for split, names in (("train", names_train), ("test", names_test)):
        xs, ys = [], []
        for name in names:
            x = cifar_images(rng, per_file)
            fine = rng.integers(0, which, per_file)
            coarse = fine // 5
            if fmt == "bin":
                if which == 10:
                    recs = np.concatenate([fine[:, None].astype(np.uint8), x.reshape(per_file, -1)], 1)
                else:
                    recs = np.concatenate([coarse[:, None].astype(np.uint8),
                                           fine[:, None].astype(np.uint8),
                                           x.reshape(per_file, -1)], 1)
                (d / (name + ".bin")).write_bytes(recs.tobytes())
            else:
                obj = {b"batch_label": b"synthetic", b"data": x.reshape(per_file, -1),
                       b"filenames": [b"img%d.png" % i for i in range(per_file)]}
                if which == 10:
                    obj[b"labels"] = [int(v) for v in fine]
                else:
                    obj[b"fine_labels"] = [int(v) for v in fine]
                    obj[b"coarse_labels"] = [int(v) for v in coarse]
                (d / name).write_bytes(dump_pickle(obj, style))
            xs.append(x)
            ys.append(fine)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return d, out


# --------------------------------------------------------------------------
# shipped default subset
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_ds():
    return data.load_default()


def test_default_shapes_dtypes(default_ds):
    ds = default_ds
    assert ds.name == "fashion-mnist-subset"
    assert ds.num_classes == 10 and ds.in_channels == 1
    assert ds.x_train.shape == (10000, 1, 32, 32)
    assert ds.x_test.shape == (2000, 1, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert ds.y_train.shape == (10000,) and ds.y_test.shape == (2000,)
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()
    assert "fashion" in repr(ds)


def test_default_balanced(default_ds):
    assert default_ds.y_train.bincount(minlength=10).tolist() == [1000] * 10
    assert default_ds.y_test.bincount(minlength=10).tolist() == [200] * 10


def test_default_normalized_and_padded(default_ds):
    ds = default_ds
    assert abs(ds.x_train.mean().item()) < 1e-4
    assert abs(ds.x_train.std().item() - 1) < 1e-3
    pixels = unnormalize(ds, ds.x_train[:200])
    # 2-pixel black border all round: 28x28 padded to 32x32
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (pixels[:, :, border] == 0).all()
    assert pixels[:, :, 2:30, 2:30].max() > 0


def test_default_matches_shipped_npz(default_ds):
    path = shipped._default_npz_path()
    with np.load(path) as z:
        x = z["x_train"][:50]
        y = z["y_train"]
    assert (unnormalize(default_ds, default_ds.x_train[:50])[:, 0, 2:30, 2:30] == x).all()
    assert (default_ds.y_train.numpy() == y).all()


def test_load_dispatch_default(default_ds):
    ds = data.load("default")
    assert torch.equal(ds.x_test, default_ds.x_test)


# --------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = write_idx_folder(tmp_path / "fm", rng, gz=gz)
    ds = data.load_idx_folder(tmp_path / "fm")
    assert ds.x_train.shape == (7, 1, 32, 32) and ds.x_test.shape == (3, 1, 32, 32)
    assert ds.num_classes == 10 and ds.in_channels == 1  # MNIST-style: 10 classes, whichever labels occur
    px = unnormalize(ds, ds.x_train)
    assert (px[:, 0, 2:30, 2:30] == arrays["train-images-idx3-ubyte"]).all()
    assert (unnormalize(ds, ds.x_test)[:, 0, 2:30, 2:30] == arrays["t10k-images-idx3-ubyte"]).all()
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # the same folder through the dispatcher, by prefix and by detection
    assert data.load(f"fashion:{tmp_path / 'fm'}").name == "fashion-mnist"
    assert data.load(f"mnist:{tmp_path / 'fm'}").name == "mnist"
    assert torch.equal(data.load(str(tmp_path / "fm")).x_train, ds.x_train)


def test_read_idx_generic(tmp_path):
    p = tmp_path / "a-idx3-ubyte"
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p.write_bytes(idx_bytes(arr))
    assert (data.read_idx(p) == arr).all()


def test_idx_truncated_names_file(tmp_path):
    rng = np.random.default_rng(1)
    arrays = write_idx_folder(tmp_path, rng)
    bad = tmp_path / "train-images-idx3-ubyte"
    full = idx_bytes(arrays["train-images-idx3-ubyte"])
    bad.write_bytes(full[:-10])
    with pytest.raises(data.DataFormatError) as e:
        data.load_idx_folder(tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg
    assert f"expected {len(full)} bytes" in msg and f"actual {len(full) - 10} bytes" in msg


def test_idx_truncated_gzip_stream(tmp_path):
    rng = np.random.default_rng(2)
    write_idx_folder(tmp_path, rng, gz=True)
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])
    with pytest.raises(data.DataFormatError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_idx_folder(tmp_path)


def test_idx_bad_magic(tmp_path):
    rng = np.random.default_rng(3)
    write_idx_folder(tmp_path, rng)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(b"\x12\x34" + p.read_bytes()[2:])
    with pytest.raises(data.DataFormatError, match="train-labels-idx1-ubyte.*magic"):
        data.load_idx_folder(tmp_path)


def test_idx_count_mismatch(tmp_path):
    rng = np.random.default_rng(4)
    write_idx_folder(tmp_path, rng)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(data.DataFormatError, match="7 images.*5 labels"):
        data.load_idx_folder(tmp_path)


def test_idx_label_out_of_range_names_file_and_value(tmp_path):
    """One label 200 is an error naming the file and the label, not a 201-class problem."""
    arrays = write_idx_folder(tmp_path, np.random.default_rng(6))
    labels = arrays["t10k-labels-idx1-ubyte"].copy()
    labels[1] = 200
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(data.DataFormatError, match=r"t10k-labels-idx1-ubyte: label 200 \(at position 1.*0\.\.9"):
        data.load(str(tmp_path))
    assert data.load_idx_folder(tmp_path, num_classes=201).num_classes == 201  # said so: fine


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_cifar_label_out_of_range_names_file(tmp_path, fmt):
    d, _ = write_cifar(tmp_path, 10, fmt, np.random.default_rng(0), style="2")
    name = "test_batch.bin" if fmt == "bin" else "test_batch"
    if fmt == "bin":
        raw = bytearray((d / name).read_bytes())
        raw[0] = 10
        (d / name).write_bytes(bytes(raw))
    else:
        batch = pickle.loads((d / name).read_bytes(), encoding="bytes")
        batch[b"labels"][0] = 10
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(data.DataFormatError, match=rf"{name}: label 10 \(at position 0.*0\.\.9"):
        data.load_cifar(tmp_path, 10, check_sizes=False)


def test_idx_missing_lists_expected(tmp_path):
    rng = np.random.default_rng(5)
    write_idx_folder(tmp_path, rng)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(data.MissingFilesError) as e:
        data.load_idx_folder(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in msg


# --------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------


def check_cifar(ds, out, which):
    x_tr, y_tr = out["train"]
    x_te, y_te = out["test"]
    assert ds.name == f"cifar{which}" and ds.num_classes == which and ds.in_channels == 3
    assert ds.x_train.shape == (len(x_tr), 3, 32, 32) and ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64
    assert (unnormalize(ds, ds.x_train) == x_tr).all()
    assert (unnormalize(ds, ds.x_test) == x_te).all()
    assert ds.y_train.tolist() == y_tr.tolist() and ds.y_test.tolist() == y_te.tolist()
    per_channel = ds.x_train.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("which", [10, 100])
@pytest.mark.parametrize("fmt,style", [("bin", None), ("py", "py2"), ("py", "4"), ("py", "5")])
def test_cifar_formats(tmp_path, which, fmt, style):
    rng = np.random.default_rng(which)
    d, out = write_cifar(tmp_path, which, fmt, rng, style=style)
    # parent folder and the data folder itself both work
    check_cifar(data.load_cifar(tmp_path, which, check_sizes=False), out, which)
    check_cifar(data.load_cifar(d, which, check_sizes=False), out, which)
    # dispatcher: by prefix and by detection
    check_cifar(data.load(f"cifar{which}:{tmp_path}", check_sizes=False), out, which)
    check_cifar(data.load(str(d), check_sizes=False), out, which)


def test_cifar_official_sizes_enforced(tmp_path):
    write_cifar(tmp_path, 10, "bin", np.random.default_rng(0))
    with pytest.raises(data.DataFormatError, match="data_batch_1.bin.*2 records.*10000"):
        data.load_cifar(tmp_path, 10)


def test_cifar_binary_truncated(tmp_path):
    d, _ = write_cifar(tmp_path, 100, "bin", np.random.default_rng(0))
    p = d / "test.bin"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(data.DataFormatError) as e:
        data.load_cifar(tmp_path, 100, check_sizes=False)
    assert "test.bin" in str(e.value) and "3074-byte" in str(e.value)


def test_cifar10_batch_with_fewer_records(tmp_path):
    d, _ = write_cifar(tmp_path, 10, "bin", np.random.default_rng(0))
    p = d / "data_batch_4.bin"
    p.write_bytes(p.read_bytes()[:3073])  # one whole record left
    with pytest.raises(data.DataFormatError, match="data_batch_4.bin: 1"):
        data.load_cifar(tmp_path, 10, check_sizes=False)


def test_cifar_missing_some_files(tmp_path):
    d, _ = write_cifar(tmp_path, 10, "py", np.random.default_rng(0))
    os.remove(d / "data_batch_3")
    os.remove(d / "test_batch")
    with pytest.raises(data.MissingFilesError) as e:
        data.load_cifar(tmp_path, 10)
    msg = str(e.value)
    assert str(d) in msg
    assert "data_batch_3, test_batch" in msg  # what is missing
    for i in range(1, 6):  # and everything expected
        assert f"data_batch_{i}" in msg


def test_cifar_nothing_there(tmp_path):
    with pytest.raises(data.MissingFilesError) as e:
        data.load_cifar(tmp_path, 100)
    msg = str(e.value)
    for piece in (str(tmp_path), "train.bin", "test.bin", "cifar-100-binary",
                  "cifar-100-python"):
        assert piece in msg
    with pytest.raises(data.MissingFilesError, match="could not recognise"):
        data.load(str(tmp_path))


def test_pickle_codecs_only_latin1(tmp_path):
    # protocol-2 pickles from Python 3 encode bytes via _codecs.encode(s, 'latin1')
    d, out = write_cifar(tmp_path, 10, "py", np.random.default_rng(0), style="2")
    check_cifar(data.load_cifar(tmp_path, 10, check_sizes=False), out, 10)
    p = d / "test_batch"
    p.write_bytes(p.read_bytes().replace(b"latin1", b"rot_13"))
    with pytest.raises(data.UnsafePickleError, match="test_batch.*rot_13"):
        data.load_cifar(tmp_path, 10, check_sizes=False)


def test_cifar_pickle_wrong_keys(tmp_path):
    d, _ = write_cifar(tmp_path, 100, "py", np.random.default_rng(0), style="4")
    (d / "train").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(data.DataFormatError, match="fine_labels"):
        data.load_cifar(tmp_path, 100, check_sizes=False)


# --------------------------------------------------------------------------
# malicious pickles: refused, never executed
# --------------------------------------------------------------------------


class _SystemPayload:
    """Pickles as os.system(cmd).  Pickling only records the call; it runs
    only if something unpickles it without restriction."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalPayload:
    def __init__(self, expr):
        self.expr = expr

    def __reduce__(self):
        return (builtins.eval, (self.expr,))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload_kind", ["system", "eval", "nested"])
def test_malicious_pickle_refused(tmp_path, payload_kind, protocol):
    d, _ = write_cifar(tmp_path, 10, "py", np.random.default_rng(0), style="4")
    marker = tmp_path / "pwned"
    # harmless payloads that leave a marker file if they ever run
    if payload_kind == "system":
        obj, refused = _SystemPayload(f"touch '{marker}'"), f"{os.system.__module__}.system"
    elif payload_kind == "eval":
        obj = _EvalPayload(f"__import__('pathlib').Path({str(marker)!r}).touch()")
        # protocol 2 writes the Python 2 module name
        refused = "__builtin__.eval" if protocol == 2 else "builtins.eval"
    else:  # hidden inside an otherwise well-formed batch
        obj = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
               b"batch_label": _SystemPayload(f"touch '{marker}'")}
        refused = f"{os.system.__module__}.system"
    (d / "data_batch_2").write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(data.UnsafePickleError) as e:
        data.load_cifar(tmp_path, 10, check_sizes=False)
    assert refused in str(e.value) and "data_batch_2" in str(e.value)
    assert isinstance(e.value, pickle.UnpicklingError)
    assert not marker.exists()


# --------------------------------------------------------------------------
# augmentation and batching
# --------------------------------------------------------------------------


def test_augment_deterministic_and_shape():
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = data.augment(x, torch.Generator().manual_seed(7))
    b = data.augment(x, torch.Generator().manual_seed(7))
    c = data.augment(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_augment_flip_and_identity():
    x = torch.randn(4, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(data.augment(x, g, flip_p=1.0, max_degrees=0), x.flip(-1))
    assert torch.equal(data.augment(x, g, flip_p=0.0, max_degrees=0), x)


def test_augment_small_rotation_keeps_content():
    # a centred blob stays roughly in place under +-15 degree rotations
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / 20).view(1, 1, 32, 32)
    out = data.augment(blob.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1))
    assert torch.allclose(out, blob.expand_as(out), atol=0.05)
    assert torch.isfinite(out).all()


def test_batches_deterministic_cover():
    a = [b.tolist() for b in data.batches(10, 3, torch.Generator().manual_seed(5))]
    b = [b.tolist() for b in data.batches(10, 3, torch.Generator().manual_seed(5))]
    assert a == b
    assert [len(x) for x in a] == [3, 3, 3, 1]
    assert sorted(sum(a, [])) == list(range(10))
    dropped = list(data.batches(10, 3, torch.Generator().manual_seed(5), drop_last=True))
    assert [len(x) for x in dropped] == [3, 3, 3]
    assert [x.tolist() for x in data.batches(5, 2)] == [[0, 1], [2, 3], [4]]
