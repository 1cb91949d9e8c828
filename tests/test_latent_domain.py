"""Latent domains: cifar10-latent (batches of cached latents with CIFAR labels and flips, the latent U-Net, decoding,
FD and the classifier's accuracy, the default autoencoder trained on first use) and imagefolder:PATH (every bad
folder refused with a clear error; good folders, flat or with class folders, work through the pipeline)."""

import pytest
import torch

from fewstep_lab import autoencoder as A
from fewstep_lab import pipeline as P
from fewstep_lab.data.download import DataUnavailableError
from fewstep_lab.data.registry import resolve_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ae_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / "ae.pt"
    A.train_autoencoder(A.autoencoder_recipe("smoke", steps=10), checkpoint_path=path, progress=False)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Encodings go to a temporary cache (FEWSTEP_CACHE), not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSTEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def domain(ae_path, cache):
    run = P.make_run("edm", "cifar10-latent", "smoke", autoencoder=str(ae_path))
    return P.make_domain(run)


def test_batches_labels_shapes_and_decoding(domain):
    from fewstep_lab.data.cifar10_domain import load_images

    assert domain.shape == (4, 8, 8) and domain.num_classes == 10
    images, labels = load_images(domain.recipe.image_recipe(), with_labels=True)
    assert torch.equal(domain.images, images) and torch.equal(domain.labels, labels)
    assert torch.bincount(labels, minlength=10).tolist() == [40] * 10  # the shipped sample
    z, z_flip = domain.latents
    assert z.shape == (400, 4, 8, 8) and z.dtype == torch.float32
    assert torch.allclose(z, A.encode_images(domain.autoencoder, images), atol=1e-6)
    x, y = domain.batch_fn(64, labels=True)(torch.Generator().manual_seed(0))
    assert x.shape == (64, 4, 8, 8) and y.shape == (64,)
    # every row is a training latent (or its mirror image's) and its label is that image's label
    for xi, yi in zip(x, y):
        hit = ((z - xi).flatten(1).abs().amax(1) < 1e-6) | ((z_flip - xi).flatten(1).abs().amax(1) < 1e-6)
        assert hit.any() and set(labels[hit].tolist()) == {int(yi)}
    flips = sum(bool(((z_flip - xi).flatten(1).abs().amax(1) < 1e-6).any()) for xi in x)
    assert 10 < flips < 54  # about half are mirrored
    x0 = domain.batch_fn(64)(torch.Generator().manual_seed(0))
    assert torch.equal(x0, x)  # the same draw without labels
    # decode(encode(x)) and postprocess
    pix = domain.decode(domain.encode(images[:5]))
    assert pix.shape == (5, 3, 16, 16) and pix.min() >= -1 and pix.max() <= 1
    assert torch.equal(domain.postprocess(z[:5]), domain.decode(z[:5]))
    net = domain.make_net(num_classes=10)
    assert net.in_channels == 4 and net.resolution == 8 and net.num_classes == 10
    assert net(z[:2], torch.zeros(2), torch.tensor([1, 10])).shape == (2, 4, 8, 8)


def test_pipeline_trains_samples_images_and_evaluates(domain):
    run = P.make_run("edm", "cifar10-latent", "smoke", steps=2, autoencoder=domain.recipe.autoencoder)
    D, st = P.train_run(run, progress=False, domain=domain)
    assert st.step == 2
    x = P.sample(D, run, 6, steps=2, domain=domain)
    assert x.shape == (6, 3, 16, 16)  # images, decoded
    res = domain.evaluate(D, "heun", P.default_sigmas(run, 2), n=20)
    assert res.accuracy is None and res.fd_mean > 0 and res.seconds_per_image > 0 and "ms/image" in res.row()

    def zero(x, sigma, cond=None):  # a denoiser that answers 0: every sample decodes G(0)
        return torch.zeros_like(x)

    labels = torch.arange(20) % 10
    res = domain.evaluate(zero, "euler", torch.tensor([1.0, 0.0]), n=20, cond=labels)
    images = domain.generate(zero, "euler", torch.tensor([1.0, 0.0]), 20, cond=labels)
    from fewstep_lab.data.cifar10_domain import _to32
    from fewstep_lab.metrics_images import classifier_accuracy

    assert res.accuracy == pytest.approx(classifier_accuracy(_to32(images), labels))
    assert res.fd_mean == pytest.approx(domain.fd(images))
    tupled = domain.evaluate(zero, "euler", torch.tensor([1.0, 0.0]), n=20, cond=(labels, torch.full((20,), 3.0)))
    assert tupled.accuracy == res.accuracy
    nolabel = domain.evaluate(zero, "euler", torch.tensor([1.0, 0.0]), n=20, cond=torch.full((20,), 10))
    assert nolabel.accuracy is None
    assert domain.balanced_labels(12).tolist() == list(range(10)) + [0, 1]
    ceiling = domain.reference_accuracy(100)
    assert set(ceiling) == {"real", "reconstructed"} and ceiling["real"] > 0.2  # 10 classes: chance is 0.1
    lo, _ = domain.floor(100)
    assert 0 < lo < res.fd_mean


def test_classifier_accuracy():
    from fewstep_lab.data.images import load_cifar10
    from fewstep_lab.metrics_images import classifier_accuracy, load_fd_classifier

    images, labels = load_cifar10("sample", "test")
    clf = load_fd_classifier()
    with torch.no_grad():
        guess = clf(images.float() / 127.5 - 1).argmax(1)
    assert classifier_accuracy(images, guess, classifier=clf) == 1.0
    assert classifier_accuracy(images, (guess + 1) % 10, classifier=clf) == 0.0
    assert classifier_accuracy(images, labels, classifier=clf) == pytest.approx((guess == labels).float().mean().item())
    with pytest.raises(ValueError, match="0..9"):
        classifier_accuracy(images[:2], torch.tensor([0, 10]))


def test_same_data_compares_the_autoencoder(domain, ae_path, tmp_path):
    from dataclasses import replace

    assert domain.same_data(domain.recipe)
    assert domain.same_data(replace(domain.recipe, model_channels=32))  # the net is not the data
    assert not domain.same_data(replace(domain.recipe, autoencoder=str(tmp_path / "other.pt")))
    assert not domain.same_data(replace(domain.recipe, classes=("cat",)))


def test_the_default_autoencoder_is_trained_once_on_first_use(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("FEWSTEP_RUNS", str(tmp_path / "runs"))
    run = P.make_run("edm", "cifar10-latent", "smoke", steps=1)
    d = P.make_domain(run)
    assert d.shape == (4, 8, 8)  # known from the recipe, before anything is trained
    path = d.default_ae_path()
    assert not path.exists() and path.parent == tmp_path / "runs" / "checkpoints"
    P.train_run(run, progress=False, domain=d)
    assert path.is_file() and float(A.load_autoencoder(path).scaling_factor) > 0
    mtime = path.stat().st_mtime_ns
    d2 = P.make_domain(run)
    n = A.ENCODE_COUNT[0]
    d2.latents  # noqa: B018
    assert path.stat().st_mtime_ns == mtime  # loaded, not trained again
    assert A.ENCODE_COUNT[0] == n  # the latents come from the cache
    assert d2.same_data(run.data_recipe)


def test_a_mismatched_autoencoder_is_refused(ae_path, cache):
    run = P.make_run("edm", "cifar10-latent", "smoke", autoencoder=str(ae_path), resolution=32)
    with pytest.raises(ValueError, match="reads 16 px images"):
        P.make_domain(run).autoencoder  # noqa: B018


# ----------------------------------------------------------------------------- imagefolder

def _png(path, size=(16, 16), colour=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _folder_domain(folder, ae_path):
    run = P.make_run("edm", f"imagefolder:{folder}", "smoke", autoencoder=str(ae_path))
    return P.make_domain(run)


def _bad(tmp_path, name):
    f = tmp_path / name
    if name == "empty":
        f.mkdir()
    elif name == "no-images":
        f.mkdir()
        (f / "notes.txt").write_text("hello")
        (f / "data.csv").write_text("1,2")
    elif name == "unreadable":
        _png(f / "a.png")
        (f / "b.png").write_bytes(b"this is not a png")
    elif name == "mixed-sizes":
        _png(f / "a.png", (16, 16))
        _png(f / "b.png", (32, 32))
    elif name == "not-square":
        _png(f / "a.png", (32, 16))
    elif name == "too-small":
        _png(f / "a.png", (8, 8))
    elif name == "loose-and-folders":
        _png(f / "a.png")
        _png(f / "cats" / "b.png")
    elif name == "empty-class":
        _png(f / "cats" / "b.png")
        (f / "dogs").mkdir()
    elif name == "a-file":
        f.write_text("x")
    return f


@pytest.mark.parametrize("case,error,needles", [
    ("missing", DataUnavailableError, ("does not exist", "imagefolder:PATH")),
    ("a-file", ValueError, ("is a file, not a folder",)),
    ("empty", ValueError, ("is empty", "put images in it")),
    ("no-images", ValueError, ("holds no images", "notes.txt", ".png")),
    ("unreadable", ValueError, ("cannot read the image", "b.png", "delete or replace it")),
    ("mixed-sizes", ValueError, ("differ in size", "16x16", "32x32", "resize them all")),
    ("not-square", ValueError, ("32x16", "not square", "crop or resize")),
    ("too-small", ValueError, ("8x8", "smaller than", "16x16")),
    ("loose-and-folders", ValueError, ("mixes images", "move the loose images")),
    ("empty-class", ValueError, ("class folder", "dogs", "holds no images")),
])
def test_bad_image_folders_are_refused_clearly(tmp_path, ae_path, cache, case, error, needles):
    folder = _bad(tmp_path, case)
    d = _folder_domain(folder, ae_path)
    with pytest.raises(error) as info:
        d.batch_fn(4)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_a_bad_folder_fails_the_cli_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    folder = _bad(tmp_path, "mixed-sizes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_PROFILE": "smoke", "FEWSTEP_DEBUG": "",
           "FEWSTEP_RUNS": str(tmp_path / "runs"), "FEWSTEP_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "fewstep_lab", "train", "--method", "edm", "--data",
                           f"imagefolder:{folder}", "--steps", "1", "--out", str(tmp_path / "m.pt"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "training the autoencoder" not in line
             and not line.startswith("train")]
    assert done.returncode == 2 and len(lines) == 1 and "differ in size" in lines[0], done.stderr


def test_good_image_folders_flat_and_with_classes(tmp_path, ae_path, cache):
    assert resolve_data(f"imagefolder:{tmp_path}/x") == ("imagefolder", {"folder": str(tmp_path / "x")})
    with pytest.raises(ValueError, match="needs a folder"):
        resolve_data("imagefolder:")
    flat = tmp_path / "flat"
    for i in range(6):
        _png(flat / f"{i}.png", (32, 32), (40 * i, 100, 255 - 40 * i))
    (flat / "README.txt").write_text("ignored: not an image")
    d = _folder_domain(flat, ae_path)
    assert d.images.shape == (6, 3, 16, 16)  # 32x32 resized to the autoencoder's 16x16
    assert d.images[0, :, 5, 5].tolist() == [0, 100, 255]  # a flat colour stays itself
    assert d.num_classes is None and d.labels is None
    assert d.batch_fn(4)(torch.Generator().manual_seed(0)).shape == (4, 4, 8, 8)
    with pytest.raises(ValueError, match="no labels"):
        d.batch_fn(4, labels=True)
    run = P.make_run("edm", f"imagefolder:{flat}", "smoke", steps=2, autoencoder=str(ae_path))
    D, st = P.train_run(run, progress=False, domain=d)
    assert P.sample(D, run, 3, steps=1, domain=d).shape == (3, 3, 16, 16)
    assert d.floor(4)[0] >= 0

    classes = tmp_path / "classes"
    for name, colour in (("zebra", (0, 0, 0)), ("apple", (255, 0, 0))):
        for i in range(3):
            _png(classes / name / f"{i}.jpg", (16, 16), colour)
    d = _folder_domain(classes, ae_path)
    assert d.classes == ["apple", "zebra"] and d.num_classes == 2
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.images[0, 0].float().mean() > 200 and d.images[3].float().mean() < 10  # apple red, zebra black
    x, y = d.batch_fn(8, labels=True)(torch.Generator().manual_seed(0))
    assert x.shape == (8, 4, 8, 8) and set(y.tolist()) <= {0, 1}


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_every_profile_builds_its_latent_net(profile):
    run = P.make_run("edm", "cifar10-latent", profile)
    d = P.make_domain(run)
    assert d.shape == (4, 8, 8)
    net = d.make_net(num_classes=10)
    assert net(torch.zeros(2, *d.shape), torch.zeros(2), torch.tensor([0, 10])).shape == (2, *d.shape)
