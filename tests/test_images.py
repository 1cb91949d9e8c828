"""Tests of CIFAR-10 loading, caching and batching (fewstep_lab/data/images.py)."""

import builtins
import os
import pickle

import numpy as np
import pytest
import torch

from fewstep_lab.data import images as im

SHARED = im.REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared CIFAR-10 copy at {SHARED}")


def write_python_format(folder, per_batch=20, seed=0, protocol=2):
    """A tiny CIFAR-10 in the official layout: dicts of bytes keys, (N, 3072) uint8, list labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written = {}
    for split, names in im.PY_FILES.items():
        data, labels = [], []
        for name in names:
            x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            y = [int(v) for v in rng.permutation(per_batch) % 10]
            with open(folder / name, "wb") as f:
                pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x,
                             b"filenames": [b"x.png"] * per_batch}, f, protocol=protocol)
            data.append(x)
            labels += y
        written[split] = (np.concatenate(data).reshape(-1, 3, 32, 32), np.array(labels))
    return written


@needs_shared
def test_shared_jpeg_subset(tmp_path):
    from PIL import Image

    x, y = im.load_cifar10(SHARED, "test", cache_dir=tmp_path, limit=50)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (50,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10
    assert bool((y[1:] >= y[:-1]).all())  # class by class, alphabetical
    first = np.array(Image.open(SHARED / "test" / "airplane" / "0000.jpg").convert("RGB"))
    assert torch.equal(x[0], torch.from_numpy(first).permute(2, 0, 1))
    assert x.float().std() > 20  # real pixels, not a constant


@needs_shared
def test_cache_round_trip_and_no_second_decode(tmp_path, monkeypatch):
    first = im.load_cifar10(SHARED, "test", cache_dir=tmp_path, limit=20)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and "test" in files[0].name

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(im, "_decode", no_decoding)
    second = im.load_cifar10(SHARED, "test", cache_dir=tmp_path, limit=20)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_python_format_read_and_found_from_parent(tmp_path):
    written = write_python_format(tmp_path / "cifar-10-batches-py")
    assert im.find_cifar10(tmp_path) == tmp_path / "cifar-10-batches-py"
    for split in ("train", "test"):
        x, y = im.load_cifar10(tmp_path, split, cache_dir=tmp_path / "cache")
        assert torch.equal(x, torch.from_numpy(written[split][0]))
        assert torch.equal(y, torch.from_numpy(written[split][1]))
    # limit: the first 2 of each class in file order, same result from the full cache
    x, y = im.load_cifar10(tmp_path / "cifar-10-batches-py", "train",
                           cache_dir=tmp_path / "cache", limit=20)
    labels = written["train"][1]
    idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)]))
    assert torch.equal(x, torch.from_numpy(written["train"][0][idx]))
    fresh = im.load_cifar10(tmp_path, "train", cache_dir=tmp_path / "cache2", limit=20)
    assert torch.equal(fresh[0], x) and torch.equal(fresh[1], y)


def test_cache_keyed_by_source_and_never_inside_data(tmp_path):
    a = write_python_format(tmp_path / "a" / "cifar-10-batches-py", seed=1)
    b = write_python_format(tmp_path / "b" / "cifar-10-batches-py", seed=2)
    cache = tmp_path / "cache"
    xa, _ = im.load_cifar10(tmp_path / "a", "test", cache_dir=cache)
    xb, _ = im.load_cifar10(tmp_path / "b", "test", cache_dir=cache)
    assert torch.equal(xa, torch.from_numpy(a["test"][0]))
    assert torch.equal(xb, torch.from_numpy(b["test"][0]))
    with pytest.raises(ValueError, match="inside the data folder"):
        im.load_cifar10(tmp_path / "a", "test", cache_dir=tmp_path / "a" / "cifar-10-batches-py" / "c")


def test_missing_data_error_lists_places_and_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSTEP_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(im, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(FileNotFoundError) as err:
        im.find_cifar10()
    text = str(err.value)
    for base in (tmp_path, tmp_path / "repo"):
        for rel in ("data/cifar10", "data/cifar-10-batches-py", "../shared/data/cifar10-jpeg"):
            assert str((base / rel).resolve()) in text
    for fix in ("FEWSTEP_DATA", "fewstep data cifar10 --download", "--root", "./data/cifar10", im.URL):
        assert fix in text
    assert "--data" not in text  # `fewstep data` has --root; --data was never a flag of it
    assert isinstance(err.value, im.DataUnavailableError)
    # FEWSTEP_DATA, when set, is used and is the only place looked at.
    monkeypatch.setenv("FEWSTEP_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="FEWSTEP_DATA") as err:
        im.find_cifar10()
    assert str(tmp_path / "elsewhere") in str(err.value)
    write_python_format(tmp_path / "elsewhere" / "cifar-10-batches-py")
    assert im.find_cifar10() == tmp_path / "elsewhere" / "cifar-10-batches-py"
    # and the default places are searched relative to the current directory
    monkeypatch.delenv("FEWSTEP_DATA")
    write_python_format(tmp_path / "data" / "cifar-10-batches-py")
    assert im.find_cifar10() == tmp_path / "data" / "cifar-10-batches-py"


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func", [os.system, builtins.exec])
def test_restricted_unpickler_refuses_code(tmp_path, func):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Exploit(func, arg), b"labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        im._read_batch(path)
    assert not marker.exists()
    # the same kind of file with only arrays and lists is accepted
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}, protocol=2))
    x, y = im._read_batch(path)
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [3]


def test_model_range_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = im.to_model_range(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(im.from_model_range(x), pixels)
    assert torch.equal(im.from_model_range(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_random_batch_flips_are_real_and_seeded():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 4, 5), generator=gen, dtype=torch.uint8)
    labels = torch.arange(6)
    x, y = im.random_batch(images, labels, 64, torch.Generator().manual_seed(1))
    assert x.shape == (64, 3, 4, 5) and x.dtype == torch.float32 and y.dtype == torch.int64
    source = im.to_model_range(images[y])
    same = (x == source).flatten(1).all(1)
    mirrored = (x == source.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())  # each is its own image or its mirror image
    assert 10 < int(mirrored.sum()) < 54 and 10 < int(same.sum()) < 54
    x2, y2 = im.random_batch(images, labels, 64, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = im.random_batch(images, labels, 64, torch.Generator().manual_seed(1), flip=False)
    assert torch.equal(x3, im.to_model_range(images[y3]))
