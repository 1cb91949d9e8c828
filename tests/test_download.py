"""CIFAR-10 download (fewstep_lab/data/download.py) against a local HTTP server on 127.0.0.1.

The server serves a tiny archive in the official format (random pixels), a truncated response
(Content-Length larger than what is sent), and an archive with a member escaping its folder.
No test touches the network beyond 127.0.0.1.
"""

import functools
import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest
import torch

from fewstep_lab.data import download as dl
from fewstep_lab.data import images as im


def _batch(rng, n):
    return {b"batch_label": b"x", b"labels": [int(v) for v in np.arange(n) % 10],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def make_archive(seed=0, per_batch=10, evil=False):
    """A .tar.gz like cifar-10-python.tar.gz: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    rng = np.random.default_rng(seed)
    batches = {name: _batch(rng, per_batch) for name in dl.EXPECTED}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {**{f"{dl.PY_FOLDER}/{k}": pickle.dumps(v, protocol=2) for k, v in batches.items()},
                   f"{dl.PY_FOLDER}/batches.meta": pickle.dumps({b"label_names": []}, protocol=2)}
        if evil:
            members["../escaped"] = b"outside"
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), batches


class _Handler(http.server.BaseHTTPRequestHandler):
    routes = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        cut = self.path.startswith("/cut")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) * 2 if cut else len(body)))
        self.end_headers()
        self.wfile.write(body)  # for /cut: half of the announced bytes, then the connection closes
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    archive, batches = make_archive()
    _Handler.routes = {"/ok.tar.gz": archive, "/cut.tar.gz": archive[: len(archive) // 2],
                       "/evil.tar.gz": make_archive(evil=True)[0], "/not-a-tar.tar.gz": b"hello" * 100}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield {"base": base, "md5": hashlib.md5(archive).hexdigest(), "batches": batches}
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch):
    for name in ("CI", dl.NO_DOWNLOAD_ENV, dl.URL_ENV, "FEWSTEP_DATA"):
        monkeypatch.delenv(name, raising=False)


def _nothing_left(tmp_path, keep=()):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep) == []


def test_success_then_load_cifar10_reads_it(server, tmp_path):
    root = tmp_path / "data" / "cifar10"
    folder = dl.download_cifar10(root, url=server["base"] + "/ok.tar.gz", md5=server["md5"], progress=False)
    assert folder == root / "cifar-10-batches-py" and folder.is_dir()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar10"]  # no archive, no temp folder
    x, y = im.load_cifar10(root, "test", cache_dir=tmp_path / "cache")
    want = server["batches"]["test_batch"]
    assert torch.equal(x, torch.from_numpy(want[b"data"].reshape(-1, 3, 32, 32)))
    assert y.tolist() == want[b"labels"]
    assert im.load_cifar10(root, "train", cache_dir=tmp_path / "cache")[0].shape == (50, 3, 32, 32)
    # a second call finds it and downloads nothing (the URL is not even contacted)
    assert dl.download_cifar10(root, url="http://127.0.0.1:9/never") == folder


def test_into_an_existing_folder_keeps_its_other_files(server, tmp_path):
    root = tmp_path / "cifar10"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    dl.download_cifar10(root, url=server["base"] + "/ok.tar.gz", md5=server["md5"], progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "notes.txt"]
    assert _nothing_left(tmp_path, keep={"cifar10"})


@pytest.mark.parametrize("route, md5, match", [
    ("/ok.tar.gz", dl.MD5, "MD5 is [0-9a-f]{32}, expected " + dl.MD5),
    ("/cut.tar.gz", None, r"connection was cut after [\d,]+ of [\d,]+ bytes"),
    ("/evil.tar.gz", None, "unsafe member '../escaped'"),
    ("/not-a-tar.tar.gz", None, "not a readable .tar.gz"),
    ("/missing.tar.gz", None, "HTTP 404"),
])
def test_failures_leave_nothing_behind(server, tmp_path, route, md5, match):
    root = tmp_path / "data" / "cifar10"
    with pytest.raises(dl.DataUnavailableError, match=match) as info:
        dl.download_cifar10(root, url=server["base"] + route, md5=md5, progress=False)
    text = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and "\n" not in text
    assert "download" in text and "./data/cifar10" in text and "FEWSTEP_DATA" in text  # the manual route
    assert _nothing_left(tmp_path)  # not even the data/ folder this call created
    assert not (tmp_path.parent / "escaped").exists()


def test_unreachable_url_is_one_clear_line(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(dl.URL_ENV, f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")  # the env var is used
    (tmp_path / "data").mkdir()
    with pytest.raises(dl.DataUnavailableError, match=f"127.0.0.1:{port}.*could not reach the server") as info:
        dl.download_cifar10(tmp_path / "data" / "cifar10", progress=False, timeout=5)
    assert "\n" not in str(info.value) and dl.URL in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and not any((tmp_path / "data").iterdir())


def test_disk_full_midway_is_reported_and_cleaned(server, tmp_path, monkeypatch):
    import errno

    def full(url, dest, timeout, progress):
        dest.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "_stream", full)
    with pytest.raises(dl.DataUnavailableError, match="disk is full"):
        dl.download_cifar10(tmp_path / "data" / "cifar10", url=server["base"] + "/ok.tar.gz")
    assert _nothing_left(tmp_path)


@pytest.mark.parametrize("env, allowed", [
    ({}, True),
    ({"CI": "true"}, False),
    ({"CI": ""}, True),
    ({"FEWSTEP_NO_DOWNLOAD": "1"}, False),
    ({"FEWSTEP_NO_DOWNLOAD": "0"}, True),
    ({"CI": "1", "FEWSTEP_NO_DOWNLOAD": "1"}, False),
])
def test_auto_download_decision(env, allowed):
    ok, why = dl.auto_download_allowed(env)
    assert ok is allowed and (ok or ("CI" in why or "FEWSTEP_NO_DOWNLOAD" in why))


def test_load_cifar10_downloads_once_when_allowed(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(im, "_download_tried", False)
    monkeypatch.setenv("FEWSTEP_DATA", str(tmp_path / "d"))  # nothing there yet: the download goes there
    monkeypatch.setenv(dl.URL_ENV, server["base"] + "/ok.tar.gz")
    # the served archive is not the official one: accept its MD5 (load_cifar10 calls im.download_cifar10)
    monkeypatch.setattr(im, "download_cifar10", functools.partial(dl.download_cifar10, md5=server["md5"]))
    x, _ = im.load_cifar10(None, "test", cache_dir=tmp_path / "cache")
    assert x.shape == (10, 3, 32, 32) and "downloading it once" in capsys.readouterr().out


def test_load_cifar10_tries_once_and_not_under_ci(server, tmp_path, monkeypatch):
    monkeypatch.setattr(im, "_download_tried", False)
    monkeypatch.setenv("FEWSTEP_DATA", str(tmp_path / "d"))
    monkeypatch.setenv(dl.URL_ENV, server["base"] + "/cut.tar.gz")
    with pytest.raises(dl.DataUnavailableError, match="connection was cut"):
        im.load_cifar10(None, "test", cache_dir=tmp_path / "cache")
    with pytest.raises(dl.DataUnavailableError, match="CIFAR-10 not found"):  # no second attempt
        im.load_cifar10(None, "test", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(im, "_download_tried", False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(dl.DataUnavailableError, match="Not downloaded automatically: running under CI"):
        im.load_cifar10(None, "test", cache_dir=tmp_path / "cache")
    with pytest.raises(dl.DataUnavailableError, match="CIFAR-10 not found") as info:
        im.load_cifar10(tmp_path / "explicit", "test")  # an explicit root never triggers a download
    assert "Not downloaded" not in str(info.value)
    assert not (tmp_path / "d").exists()
