"""The KL autoencoder of latent diffusion: shapes, the KL term against torch.distributions, PSNR by hand, training
through train.train (the loss falls), the scaling factor (1 / std of the training latents, recomputed here) stored
in and reloaded from the checkpoint, clear errors for wrong files, the encoding cache, and `fewstep autoencoder`."""

import math
import os
import subprocess
import sys

import pytest
import torch

from fewstep_lab import autoencoder as A
from fewstep_lab.checkpoints import CheckpointError, save_checkpoint
from fewstep_lab.data.cifar10_domain import load_images
from fewstep_lab.data.images import to_model_range
from fewstep_lab.losses.autoencoder import autoencoder_loss, kl_divergence
from fewstep_lab.nets.autoencoder import KLAutoencoder, autoencoder_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / "ae.pt"
    recipe = A.autoencoder_recipe("smoke")
    ae = A.train_autoencoder(recipe, checkpoint_path=path, progress=False)
    return ae, recipe, path


@pytest.mark.parametrize("profile,latent", [("smoke", (4, 8, 8)), ("cpu", (4, 8, 8)), ("gpu", (4, 8, 8))])
def test_shapes_and_latent_shape(profile, latent):
    sizes = autoencoder_sizes[profile]
    ae = KLAutoencoder(**sizes)
    r = sizes["resolution"]
    assert ae.latent_shape == latent == A.autoencoder_recipe(profile).latent_shape
    x = torch.rand(2, 3, r, r) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, *latent)
    assert ae.decode(mean).shape == x.shape
    assert float(ae.scaling_factor) == 1.0  # until train_autoencoder sets it
    z = ae.to_latent(x)
    assert torch.allclose(z, mean) and ae.from_latent(z).shape == x.shape
    g = torch.Generator().manual_seed(0)
    zs = ae.to_latent(x, sample=True, generator=g)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(zs, mean + torch.exp(logvar / 2) * eps, atol=1e-6)
    with pytest.raises(ValueError, match="reads images of shape"):
        ae.encode(torch.zeros(1, 3, r // 2, r // 2))
    with pytest.raises(ValueError, match="decodes latents of shape"):
        ae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        KLAutoencoder(resolution=18, channel_mult=(1, 2, 2))


def test_logvar_is_clamped_and_scaling_factor_scales():
    ae = KLAutoencoder(**autoencoder_sizes["smoke"])
    with torch.no_grad():
        ae.quant_conv.bias[4:].fill_(1e4)  # the logvar half
        ae.scaling_factor.fill_(0.5)
    x = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        mean, logvar = ae.encode(x)
    assert float(logvar.max()) == 20.0
    with torch.no_grad():
        assert torch.allclose(ae.to_latent(x), 0.5 * mean)
        assert torch.allclose(ae.from_latent(0.5 * mean), ae.decode(mean), atol=1e-6)


def test_kl_term_matches_the_closed_form_and_the_loss_adds_it():
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    q = torch.distributions.Normal(mean, torch.exp(logvar / 2))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl_divergence(mean, logvar), expected, atol=1e-5)
    assert torch.allclose(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))

    ae = KLAutoencoder(**autoencoder_sizes["smoke"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = autoencoder_loss(ae, x, kl_weight=0.3, generator=torch.Generator().manual_seed(5))
    m, lv = ae.encode(x)
    z = m + torch.exp(lv / 2) * torch.randn(m.shape, generator=torch.Generator().manual_seed(5))
    by_hand = ((ae.decode(z) - x).abs().flatten(1).sum(1) + 0.3 * kl_divergence(m, lv)) / (3 * 16 * 16)
    assert loss.shape == (2,) and torch.allclose(loss, by_hand, atol=1e-6)
    feats = lambda y: y.mean((2, 3))  # noqa: E731
    with_f = autoencoder_loss(ae, x, kl_weight=0.3, generator=torch.Generator().manual_seed(5), feature_fn=feats,
                              feature_weight=2.0)
    extra = 2.0 * (feats(x) - feats(ae.decode(z))).pow(2).mean(1)
    assert torch.allclose(with_f, by_hand + extra, atol=1e-6)
    with pytest.raises(ValueError, match="feature_fn"):
        autoencoder_loss(ae, x, kl_weight=0.0, feature_weight=1.0)


def test_psnr_against_a_hand_computation():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01: 10 log10(4 / 0.01)
    y[1, :, :2] += 0.2  # half the pixels off by 0.2: MSE 0.02
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.02)) / 2
    assert A.psnr(x, y) == pytest.approx(expected, rel=1e-6)
    u = torch.full((1, 3, 2, 2), 100, dtype=torch.uint8)
    v = u.clone()
    v[0, 0, 0, 0] = 110  # one of 12 values off by 10 / 127.5
    assert A.psnr(u, v) == pytest.approx(10 * math.log10(4 / ((10 / 127.5) ** 2 / 12)), rel=1e-6)
    assert A.psnr(u, u) == 100.0
    with pytest.raises(ValueError, match="one shape"):
        A.psnr(x, y[:1])


def test_training_lowers_the_loss_and_sets_the_scaling_factor(trained):
    ae, recipe, path = trained
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    images = load_images(recipe.image_recipe())
    x = to_model_range(images[:64])
    fresh = A.build_autoencoder(recipe)

    def loss(m):
        with torch.no_grad():
            return float(autoencoder_loss(m, x, kl_weight=recipe.kl_weight,
                                          generator=torch.Generator().manual_seed(0)).mean())
    assert loss(ae) < 0.9 * loss(fresh)
    # LDM's scaling factor, recomputed independently: 1 / std of every entry of the training latents' means
    with torch.no_grad():
        means = torch.cat([ae.encode(to_model_range(images[i:i + 100]))[0] for i in range(0, len(images), 100)])
    assert float(ae.scaling_factor) == pytest.approx(1 / means.double().std().item(), rel=1e-4)
    assert float(ae.scaling_factor) != 1.0
    z = A.encode_images(ae, images)
    assert z.std().item() == pytest.approx(1.0, rel=1e-3)
    # stored in the checkpoint's state dict and reloaded
    blob = torch.load(path, weights_only=True)
    assert float(blob["model"]["scaling_factor"]) == pytest.approx(float(ae.scaling_factor))
    again = A.load_autoencoder(path)
    assert float(again.scaling_factor) == float(ae.scaling_factor)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ae.state_dict().values()))
    ev = A.evaluate_autoencoder(ae, recipe, n=100)
    assert set(ev) == {"psnr", "psnr_train", "fd_recon", "fd_floor", "n", "n_test"}
    assert ev["psnr"] > 8 and ev["fd_recon"] > ev["fd_floor"] >= 0


def test_a_finished_checkpoint_is_loaded_another_recipe_refused(trained, tmp_path):
    ae, recipe, path = trained
    mtime = path.stat().st_mtime_ns
    same = A.train_autoencoder(recipe, checkpoint_path=path, progress=False)
    assert path.stat().st_mtime_ns == mtime and float(same.scaling_factor) == float(ae.scaling_factor)
    with pytest.raises(ValueError, match="holds another autoencoder recipe"):
        A.train_autoencoder(A.autoencoder_recipe("smoke", channels=4), checkpoint_path=path, progress=False)


def test_wrong_files_give_clear_errors(tmp_path):
    from fewstep_lab.pipeline import make_run, train_run

    other = tmp_path / "edm.pt"
    train_run(make_run("edm", "8gaussians", "smoke", steps=1), checkpoint_path=other, progress=False)
    with pytest.raises(CheckpointError, match="holds a edm model, not an autoencoder"):
        A.load_autoencoder(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a fewstep checkpoint"):
        A.load_autoencoder(junk)
    with pytest.raises(FileNotFoundError):
        A.load_autoencoder(tmp_path / "missing.pt")
    # a run stopped before its scaling factor was set
    from fewstep_lab.train import TrainState

    recipe = A.autoencoder_recipe("smoke", steps=5)
    net = A.build_autoencoder(recipe)
    state = TrainState(model=net, emas={}, optimizer=torch.optim.AdamW(net.parameters()), step=2)
    save_checkpoint(tmp_path / "half.pt", state, A._meta(recipe, scaled=False))
    with pytest.raises(CheckpointError, match="has not finished"):
        A.load_autoencoder(tmp_path / "half.pt")
    with pytest.raises(ValueError, match="unknown AutoencoderRecipe fields"):
        A.autoencoder_recipe("smoke", colour=3)
    with pytest.raises(ValueError, match="kl_weight"):
        A.autoencoder_recipe("smoke", kl_weight=-1.0)


def test_encodings_are_cached_by_weights_and_images(trained, tmp_path):
    ae, recipe, _ = trained
    images = load_images(recipe.image_recipe())[:50]
    before = A.ENCODE_COUNT[0]
    z1 = A.encode_images(ae, images, cache=True, cache_dir=tmp_path / "cache")
    assert A.ENCODE_COUNT[0] == before + 50
    z2 = A.encode_images(ae, images, cache=True, cache_dir=tmp_path / "cache")
    assert A.ENCODE_COUNT[0] == before + 50 and torch.equal(z1, z2)  # read back, not encoded again
    files = list((tmp_path / "cache" / "latents").iterdir())
    assert len(files) == 1 and A.autoencoder_key(ae) in files[0].name
    flipped = A.encode_images(ae, images, cache=True, cache_dir=tmp_path / "cache", flip=True)
    assert torch.allclose(flipped, A.encode_images(ae, images.flip(-1)), atol=1e-6)
    changed = A.load_autoencoder(trained[2])
    with torch.no_grad():
        changed.decoder[0].bias.add_(0.01)  # another autoencoder: another key, encoded again
    n = A.ENCODE_COUNT[0]
    A.encode_images(changed, images, cache=True, cache_dir=tmp_path / "cache")
    assert A.ENCODE_COUNT[0] == n + 50 and len(list((tmp_path / "cache" / "latents").iterdir())) == 3
    with pytest.raises(ValueError, match="inside the data folder"):
        A.encode_images(ae, images, cache=True, cache_dir=tmp_path / "data" / "cache", data_folder=tmp_path / "data")


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_PROFILE": "smoke", "FEWSTEP_DEBUG": ""}


def _fewstep(*args):
    done = subprocess.run([sys.executable, "-m", "fewstep_lab", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_cli_trains_reports_and_fails_in_one_line(tmp_path):
    out = tmp_path / "ae.pt"
    rc, stdout, err = _fewstep("autoencoder", "--data", "cifar10", "--out", out, "--set", "steps=3", "--quiet",
                               "--n", "50")
    assert rc == 0, err
    assert "16x16x3 -> 4x8x8" in stdout and "PSNR" in stdout and "FD of 50 reconstructions" in stdout
    assert float(A.load_autoencoder(out).scaling_factor) > 0
    for args, needle in [(("--set", "steps=3", "--set", "channels=4"), "holds another autoencoder recipe"),
                         (("--set", "bogus=1"), "no recipe field 'bogus'"),
                         (("--set", "kl_weight=-1"), "kl_weight")]:
        rc, _, err = _fewstep("autoencoder", "--out", out, "--quiet", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("fewstep autoencoder: error: ") and needle in err, err
    rc, _, err = _fewstep("autoencoder", "--out", tmp_path, "--quiet")
    assert rc == 2 and "is a folder" in err
