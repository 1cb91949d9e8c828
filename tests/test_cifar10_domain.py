"""The cifar10 domain through the one pipeline: recipes per profile, data, smoke training of teacher/CD/iCT,
checkpoints, channels_last + bf16 on CPU, sampling grids, FD plumbing. The smoke profile reads the
small CIFAR-10 sample shipped with the package, so these run on a fresh clone with nothing beside it."""

from dataclasses import replace

import pytest
import torch

from fewstep_lab import pipeline as P
from fewstep_lab.data.cifar10_domain import Cifar10, image_grid, load_images
from fewstep_lab.methods import get_method
from fewstep_lab.nets.classifier import CifarClassifier
from fewstep_lab.nets.unet import unet_sizes


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def domain():
    run = P.make_run("edm", "cifar10", "smoke")
    d = P.make_domain(run)
    d.images  # noqa: B018  (load once for the module)
    return d


def _finite_losses(state):
    return state.losses and all(torch.isfinite(torch.tensor(v)) for _, v in state.losses)


def test_recipes_per_profile():
    smoke, cpu, gpu = (P.make_run("edm", "cifar10", p) for p in ("smoke", "cpu", "gpu"))
    assert smoke.data_recipe.resolution == cpu.data_recipe.resolution == 16
    assert gpu.data_recipe.resolution == 32 and gpu.data_recipe.classes is None and smoke.data_recipe.source == "sample"
    assert gpu.data_recipe.bf16 and gpu.data_recipe.channels_last and not cpu.data_recipe.bf16
    assert {k: getattr(gpu.data_recipe, k) for k in unet_sizes["gpu"]} == unet_sizes["gpu"]
    # Domain training defaults, then the method's table: one place each.
    assert gpu.recipe.batch_size == 512 and gpu.recipe.ema_halflife_kimg == 500 and cpu.recipe.lr == 2e-3
    ict = P.make_run("ict", "cifar10", "gpu")
    assert ict.recipe.dropout == 0.3 and ict.recipe.steps == 200_000 and ict.recipe.distance == "pseudo_huber"
    assert P.make_run("cd", "cifar10", "cpu", steps=7).recipe.steps == 7
    assert P.make_run("cd", "cifar10", "cpu").recipe.distance == "pseudo_huber"
    assert P.make_run("cd", "8gaussians", "cpu").recipe.distance == "l2"
    with pytest.raises(ValueError, match="unknown method 'gan'"):
        P.make_run("gan", "cifar10", "smoke")
    with pytest.raises(ValueError, match="unknown Cifar10Recipe fields"):
        P.make_run("edm", "cifar10", "smoke", stepz=3)
    with pytest.raises(ValueError, match="resolution"):
        replace(smoke.data_recipe, resolution=8)
    with pytest.raises(ValueError, match="classes"):
        replace(smoke.data_recipe, classes=("dragon",))


def test_load_images_selects_classes_and_pools(domain):
    from fewstep_lab.data.images import load_cifar10

    recipe = domain.recipe
    images = domain.images
    assert images.shape == (recipe.train_images, 3, 16, 16) and images.dtype == torch.uint8
    full, labels = load_cifar10("sample", "train")
    first = full[labels == 1][:recipe.train_images]  # 'automobile' is class 1
    pooled = torch.nn.functional.avg_pool2d(first.float(), 2).round()
    assert torch.equal(images.float(), pooled)
    assert torch.equal(load_images(recipe, root="ignored: the recipe says sample"), images)


def test_teacher_cd_ict_smoke_steps_give_finite_losses(domain, tmp_path):
    r = P.make_run("edm", "cifar10", "smoke", steps=3)
    D, st = P.train_run(r, checkpoint_path=tmp_path / "edm.pt", progress=False, domain=domain)
    assert st.step == 3 and _finite_losses(st)
    cd = P.make_run("cd", "cifar10", "smoke")
    # CD starts from the teacher's weights (CM sec. 6): with 0 steps the student's net IS the teacher's.
    f0, _ = P.train_run(replace(cd, recipe=replace(cd.recipe, steps=0)), teacher=D, progress=False, domain=domain)
    for a, b in zip(f0.net.parameters(), D.net.parameters()):
        assert torch.equal(a, b)
    f, st = P.train_run(replace(cd, recipe=replace(cd.recipe, steps=2)), teacher=str(tmp_path / "edm.pt"),
                        progress=False, domain=domain)
    assert st.step == 2 and _finite_losses(st) and "target" in st.emas
    g, st = P.train_run(P.make_run("ict", "cifar10", "smoke", steps=2), progress=False, domain=domain)
    assert st.step == 2 and _finite_losses(st) and set(st.emas) == {"ema"}  # iCT: no EMA target
    # Consistency models obey the boundary condition f(x, sigma_min) = x exactly.
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(g(x, 0.002), x) and torch.equal(f(x, 0.002), x)
    other = P.make_run("cd", "cifar10", "smoke", classes=("cat",))
    with pytest.raises(ValueError, match="other data"):
        P.train_run(other, teacher=str(tmp_path / "edm.pt"), progress=False)
    with pytest.raises(ValueError, match="distils a diffusion teacher"):
        P.train_run(cd, teacher=str(_ict_checkpoint(tmp_path, domain)), progress=False, domain=domain)


def _ict_checkpoint(tmp_path, domain):
    path = tmp_path / "ict.pt"
    P.train_run(P.make_run("ict", "cifar10", "smoke", steps=1), checkpoint_path=path, progress=False, domain=domain)
    return path


def test_checkpoint_round_trip(domain, tmp_path):
    r = P.make_run("ict", "cifar10", "smoke", steps=2)
    f, _ = P.train_run(r, checkpoint_path=tmp_path / "ict.pt", progress=False, domain=domain)
    g, run = P.load_run(tmp_path / "ict.pt")
    assert run == r
    for a, b in zip(f.state_dict().values(), g.state_dict().values()):
        assert torch.equal(a, b)
    x1, x2 = (P.sample(m, r, 5, steps=2, seed=3, domain=domain) for m in (f, g))
    assert torch.equal(x1, x2) and x1.shape == (5, 3, 16, 16) and x1.abs().max() <= 1


def test_channels_last_and_bf16_autocast_run_on_cpu(domain):
    r = P.make_run("edm", "cifar10", "smoke", steps=2, bf16=True, channels_last=True)
    d = Cifar10(r.data_recipe, images=domain.images)
    conv = P.build_model(r, d).net.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    seen = []

    def watch(state):  # after step 1: record what the first convolution sees and returns in step 2
        state.model.net.conv_in.register_forward_hook(
            lambda m, args, out: seen.append((args[0].is_contiguous(memory_format=torch.channels_last), out.dtype)))

    D, st = P.train_run(r, progress=False, device="cpu", hooks=[(1, watch)], domain=d)
    assert _finite_losses(st)
    assert seen and all(cl and dtype == torch.bfloat16 for cl, dtype in seen)
    # Outside autocast the model computes in float32 and returns x's dtype.
    assert D(torch.randn(2, 3, 16, 16), 1.0).dtype == torch.float32


def test_sampling_grids_and_nfe():
    edm, cm = P.make_run("edm", "cifar10", "smoke"), P.make_run("cd", "cifar10", "smoke")
    teacher = get_method("edm")
    assert teacher.nfe(edm.recipe, P.default_sigmas(edm)) == 35  # EDM's 18 Heun steps
    assert P.default_sigmas(cm, 1).tolist() == [80.0, 0.0]
    assert P.default_sigmas(cm, 2).tolist() == pytest.approx([80.0, cm.recipe.multistep_sigma_min, 0.0])
    assert cm.recipe.multistep_sigma_min == 0.8  # CM/iCT's CIFAR-10 level; the toy tables use 0.25
    assert get_method("cd").nfe(cm.recipe, P.default_sigmas(cm, 2)) == 2
    grid = image_grid(torch.zeros(10, 3, 4, 4), nrow=4, pad=1)
    assert grid.shape == (3 * 5 + 1, 4 * 5 + 1, 3) and grid[0, 0].tolist() == [255, 255, 255]
    assert grid[1, 1].tolist() == [128, 128, 128]  # 0 in [-1, 1] is mid-grey


def test_fd_plumbing_with_an_untrained_classifier(domain):
    torch.manual_seed(0)
    d = Cifar10(domain.recipe, images=domain.images)
    d._classifier = CifarClassifier().eval()  # untrained: the plumbing, not the number, is tested here
    floor = d.floor(40)[0]
    noise = d.fd(torch.rand(40, 3, 16, 16) * 2 - 1)
    assert 0 < floor < noise
    run = P.make_run("edm", "cifar10", "smoke")
    res = P.evaluate(P.build_model(run, d), run, steps=2, n=8, seeds=(0, 1), domain=d)
    assert res.nfe == 3 and res.steps == 2 and res.fd_mean > 0 and res.fd_std >= 0


def test_cli_train_and_eval_on_cifar10(tmp_path, capsys, monkeypatch):
    from fewstep_lab import metrics_images
    from fewstep_lab.cli import main

    edm, cd = tmp_path / "edm.pt", tmp_path / "cd.pt"
    common = ["--data", "cifar10", "--profile", "smoke", "--steps", "2", "--quiet", "--device", "cpu"]
    assert main(["train", "--method", "edm", "--out", str(edm), *common]) == 0
    assert "1 process(es)) for 2 steps" in capsys.readouterr().out
    assert main(["train", "--method", "cd", "--out", str(cd), *common]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["train", "--method", "cd", "--teacher", str(edm), "--out", str(cd), *common]) == 0
    torch.manual_seed(0)
    classifier = CifarClassifier().eval()  # untrained: the plumbing, not the number, is tested here
    monkeypatch.setattr(metrics_images, "load_fd_classifier", lambda device="cpu": classifier)
    assert main(["eval", "--ckpt", str(cd), "--steps", "1", "2", "--n", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "NFE      1" in out and "NFE      2" in out and "noise floor" in out and "FD" in out
    png = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(cd), "--n", "8", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_labels_match_the_data_and_unconditional_batches_are_unchanged(domain):
    """Labels are CIFAR-10 class indices of the images; batch_fn(labels=False) draws exactly the old batches."""
    from fewstep_lab.data.images import load_cifar10, random_batch

    assert Cifar10.num_classes == 10
    images, labels = load_images(domain.recipe, with_labels=True)
    assert torch.equal(images, domain.images) and torch.equal(labels, domain.labels)
    assert labels.dtype == torch.long and set(labels.tolist()) == {1}  # smoke: 'automobile' only
    # all classes at 16 px: the sample holds 40 training images of each, and each label is its image's
    full, full_labels = load_cifar10("sample", "train")
    every = P.make_run("edm", "cifar10", "smoke", classes=None, train_images=None).data_recipe
    im, lab = load_images(every, with_labels=True)
    assert torch.bincount(lab, minlength=10).tolist() == torch.bincount(full_labels, minlength=10).tolist()
    assert torch.equal(lab, full_labels)
    assert torch.equal(im.float(), torch.nn.functional.avg_pool2d(full.float(), 2).round())
    two = P.make_run("edm", "cifar10", "smoke", classes=("cat", "ship"), train_images=30).data_recipe
    im2, lab2 = load_images(two, with_labels=True)
    assert len(im2) == len(lab2) == 30 and set(lab2.tolist()) <= {3, 8}
    for x, y in zip(im2, lab2):  # each image sits in the full set under its own label
        match = (torch.nn.functional.avg_pool2d(full.float(), 2).round() == x.float()).flatten(1).all(1)
        assert full_labels[match][0] == y
    # unconditional batches: the same as before labels existed (zeros as labels, same generator use)
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    old, _ = random_batch(domain.images, torch.zeros(len(domain.images), dtype=torch.long), 8, g0)
    assert torch.equal(domain.batch_fn(8)(g1), old)
    x, y = domain.batch_fn(8, labels=True)(torch.Generator().manual_seed(3))
    assert torch.equal(x, old) and y.shape == (8,) and set(y.tolist()) == {1}
    net = domain.make_net(num_classes=10)
    assert net.num_classes == 10 and domain.make_net().num_classes is None
