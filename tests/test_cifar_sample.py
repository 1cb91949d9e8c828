"""The CIFAR-10 sample shipped with the package, and the decoded-image cache's keys and error messages."""

import pickle
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep_lab.data import images as im

ROOT = Path(__file__).resolve().parents[1]
SHARED = im.REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared CIFAR-10 copy at {SHARED}")


def test_sample_is_found_and_loads_class_balanced(tmp_path):
    folder = im.find_cifar10("sample")
    assert folder == im.CIFAR10_SAMPLE / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == ["batches.meta", "data_batch_1", "test_batch"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 2_000_000
    for split, per_class in (("train", 40), ("test", 20)):
        x, y = im.load_cifar10("sample", split, cache_dir=tmp_path)
        assert x.shape == (10 * per_class, 3, 32, 32) and x.dtype == torch.uint8
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
        assert x.float().std() > 20  # real pictures
    x, y = im.load_cifar10("sample", "train", cache_dir=tmp_path, limit=20)
    assert torch.bincount(y, minlength=10).tolist() == [2] * 10
    meta = im._RestrictedUnpickler(open(folder / "batches.meta", "rb"), encoding="bytes").load()
    assert [n.decode() for n in meta[b"label_names"]] == list(im.CLASSES)


@needs_shared
def test_sample_equals_the_first_images_of_the_jpeg_copy(tmp_path):
    for split, per_class in (("train", 40), ("test", 20)):
        x, y = im.load_cifar10("sample", split, cache_dir=tmp_path)
        order = torch.argsort(y, stable=True)  # the sample interleaves classes; the copy goes class by class
        ref, ref_y = im.load_cifar10(SHARED, split, cache_dir=tmp_path, limit=10 * per_class)
        assert torch.equal(x[order], ref) and torch.equal(y[order], ref_y)


def test_sample_ships_with_the_package():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["fewstep_lab"]
    shipped = {p.relative_to(ROOT / "fewstep_lab").as_posix() for pat in patterns
               for p in (ROOT / "fewstep_lab").glob(pat) if p.is_file()}
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        assert f"assets/cifar10-sample/cifar-10-batches-py/{name}" in shipped
    assert "assets/cifar10_classifier.safetensors" in shipped


def test_sample_and_full_copy_never_share_a_cache_file(tmp_path):
    other = tmp_path / "full" / "cifar-10-batches-py"
    other.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):  # same bytes, other place
        (other / name).write_bytes((im.find_cifar10("sample") / name).read_bytes())
    a = im._cache_file(tmp_path, im.find_cifar10("sample"), "test", None)
    b = im._cache_file(tmp_path, other, "test", None)
    assert a != b


def _write_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)


def test_changed_source_is_decoded_again(tmp_path):
    folder = tmp_path / "c" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    for name in im.PY_FILES["train"]:
        _write_batch(folder / name, first, list(range(10)))
    _write_batch(folder / "test_batch", first, list(range(10)))
    x1, _ = im.load_cifar10(tmp_path / "c", "test", cache_dir=tmp_path / "cache")
    second = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    _write_batch(folder / "test_batch", second, list(range(10)) * 2)  # a new copy in the same place
    x2, _ = im.load_cifar10(tmp_path / "c", "test", cache_dir=tmp_path / "cache")
    assert torch.equal(x1, torch.from_numpy(first.reshape(-1, 3, 32, 32)))
    assert torch.equal(x2, torch.from_numpy(second.reshape(-1, 3, 32, 32)))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_damaged_cache_file_is_rebuilt(tmp_path):
    x, _ = im.load_cifar10("sample", "test", cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:100])  # truncated by a crash of some other tool
    again, _ = im.load_cifar10("sample", "test", cache_dir=tmp_path)
    assert torch.equal(again, x)


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00(X", b"garbage, not a pickle", b"PK\x03\x04"])
def test_damaged_batch_files_name_the_file(tmp_path, content):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [*im.PY_FILES["train"], "test_batch"]:
        (folder / name).write_bytes(content)
    with pytest.raises(ValueError, match=r"test_batch is damaged or not a CIFAR-10 file") as info:
        im.load_cifar10(tmp_path, "test", cache_dir=tmp_path / "cache")
    assert "--download" in str(info.value)


def test_batch_with_wrong_entries_names_the_file(tmp_path):
    path = tmp_path / "test_batch"
    _write_batch(path, np.zeros((2, 3072), np.uint8), [1, 2, 3])
    with pytest.raises(ValueError, match="test_batch is damaged.*2 images but 3 labels"):
        im._read_batch(path)
    with open(path, "wb") as f:
        pickle.dump({b"labels": [1]}, f, protocol=2)
    with pytest.raises(ValueError, match="no 'data' and 'labels'"):
        im._read_batch(path)


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    for split in ("train", "test"):
        for c in im.CLASSES:
            (root / split / c).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(root / split / c / "0000.png")
    good = (root / "test" / "cat" / "0000.png").read_bytes()
    (root / "test" / "cat" / "0000.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"test/cat/0000\.png is damaged"):
        im.load_cifar10(root, "test", cache_dir=tmp_path / "cache")
    (root / "test" / "cat" / "0000.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"test/cat/0000\.png is damaged"):
        im.load_cifar10(root, "test", cache_dir=tmp_path / "cache")
