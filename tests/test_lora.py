"""LoRA (nets/lora.py) and LCM-LoRA / style LoRA (methods/lora.py): adapters, merging, adapter files, frozen
weights, the boundary condition, the pipeline end to end and the combination of adapters."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from fewstep_lab.methods.lora import LCMBoundary, combine, export_adapter, lcm_boundary
from fewstep_lab.nets.lora import (AdapterError, LoRALayer, count_trainable, inject_lora, load_adapter, lora_layers,
                                   lora_state_dict, merge, read_adapter_meta, save_adapter, set_scale, unmerge)
from fewstep_lab.nets.mlp import MLP
from fewstep_lab.nets.unet import UNet
from fewstep_lab.pipeline import load_run, make_run, sample, train_run
from fewstep_lab.precond import edm_scalings, lcm_scalings

torch.set_num_threads(1)
DATA = "8gaussians-4class"


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), resolution=8,
                dropout=0.0, num_classes=3).eval()


def _inputs(net):
    g = torch.Generator().manual_seed(1)
    if isinstance(net, UNet):
        return torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g), torch.tensor([0, 1, 2, 3])
    return torch.randn(16, 2, generator=g), torch.rand(16, generator=g), torch.arange(16) % 5


def _randomise(model, name):
    for m in lora_layers(model, name).values():
        nn.init.normal_(m.lora_B[name], std=0.05)


@pytest.mark.parametrize("make", [lambda: MLP(hidden=32, depth=2, num_classes=4), _unet])
def test_fresh_adapter_leaves_outputs_bit_identical_and_freezes_the_base(make):
    net = make()
    x, c, y = _inputs(net)
    ref, keys = net(x, c, y), set(net.state_dict())
    names = inject_lora(net, 4, name="a")
    kinds = {type(m.weight).__name__ for m in lora_layers(net).values()}
    assert names and kinds == {"Parameter"}
    if isinstance(net, UNet):  # 3x3 and 1x1 convolutions and linear layers are all adapted
        shapes = {tuple(m.weight.shape[2:]) for m in lora_layers(net).values()}
        assert {(3, 3), (1, 1), ()} <= shapes
    assert torch.equal(net(x, c, y), ref)
    assert keys < set(net.state_dict()) and all(".lora_" in k for k in set(net.state_dict()) - keys)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("make", [lambda: MLP(hidden=32, depth=2, num_classes=4), _unet])
def test_merge_and_unmerge_are_exact_with_several_scaled_adapters(make):
    net = make()
    x, c, y = _inputs(net)
    inject_lora(net, 4, name="acc")
    inject_lora(net, 2, alpha=8.0, name="style")
    _randomise(net, "acc"), _randomise(net, "style")
    set_scale(net, "style", 0.7)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = net(x, c, y)
    assert not torch.allclose(out, make()(x, c, y))  # the adapters do something
    merge(net, "acc")
    merge(net, "style")
    changed = [k for k in before if not torch.equal(before[k], net.state_dict()[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    assert torch.allclose(net(x, c, y), out, rtol=1e-5, atol=1e-6)  # merged forward == unmerged forward
    with pytest.raises(ValueError, match="unmerge"):
        set_scale(net, "acc", 2.0)
    unmerge(net, "style")
    unmerge(net, "acc")
    for k, v in before.items():
        assert torch.allclose(net.state_dict()[k], v, rtol=0, atol=1e-6), k  # W to float rounding
    assert torch.allclose(net(x, c, y), out, rtol=1e-5, atol=1e-6)
    # lambda = 0 switches an adapter off exactly; W + lambda (alpha / r) B A in every layer.
    set_scale(net, "acc", 0.0), set_scale(net, "style", 0.0)
    ref = make()
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if ".lora_" not in k})
    assert torch.equal(net(x, c, y), ref(x, c, y))
    layer = next(iter(lora_layers(net).values()))
    assert layer.factor("style") == 0.0 and layer.alpha["style"] == 8.0


def test_adapter_file_is_small_holds_only_adapter_tensors_and_refuses_other_models(tmp_path):
    net = MLP(hidden=128, depth=4, num_classes=4)
    inject_lora(net, 4, name="default")
    _randomise(net, "default")
    path = tmp_path / "a.safetensors"
    save_adapter(path, net, "default", {"kind": "style", "note": "test"})
    from safetensors.torch import load_file

    tensors = load_file(path)
    assert set(tensors) == set(lora_state_dict(net))
    assert all(k.endswith((".lora_A", ".lora_B")) for k in tensors)
    n_adapter = sum(t.numel() for t in tensors.values())
    n_model = sum(v.numel() for k, v in net.state_dict().items() if ".lora_" not in k)
    ratio = path.stat().st_size / (4 * n_model)
    print(f"adapter file {path.stat().st_size} bytes, {n_adapter} numbers; model {n_model} numbers; ratio {ratio:.3f}")
    assert ratio < 0.15
    assert read_adapter_meta(path) == {"kind": "style", "note": "test"}
    fresh = MLP(hidden=128, depth=4, num_classes=4)
    fresh.load_state_dict({k: v for k, v in net.state_dict().items() if ".lora_" not in k})
    load_adapter(path, fresh, "default")
    x, c, y = _inputs(fresh)
    assert torch.equal(fresh(x, c, y), net(x, c, y))
    with pytest.raises(AdapterError, match="layer .* has weight"):
        load_adapter(path, MLP(hidden=64, depth=4, num_classes=4))
    with pytest.raises(AdapterError, match="lacks"):
        load_adapter(path, MLP(hidden=128, depth=2, num_classes=4))
    (tmp_path / "junk").write_bytes(b"not an adapter at all")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        load_adapter(tmp_path / "junk", fresh, "other")


def test_boundary_wrapper_is_lcm_scalings_and_exact_at_sigma_min():
    s = torch.tensor([0.002, 0.01, 0.3, 2.0, 80.0], dtype=torch.float64)
    b_skip, b_out = lcm_boundary(s)
    c_skip, c_out, _, _ = lcm_scalings(s)
    e_skip, e_out, _, _ = edm_scalings(s)
    assert torch.allclose(c_skip, b_skip + b_out * e_skip) and torch.allclose(c_out, b_out * e_out)
    f = LCMBoundary(lambda x, sigma, cond: torch.randn_like(x) * 100, sigma_min=0.002)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(32, 2, dtype=dtype)
        assert torch.equal(f(x, 0.002), x)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "teacher.pt"
    subprocess.run([sys.executable, "-m", "fewstep_lab", "train", "--method", "edm-cfg", "--data", DATA, "--profile",
                    "smoke", "--steps", "30", "--out", str(path)], check=True, capture_output=True)
    return path


def test_lcm_lora_trains_only_the_adapter_end_to_end(teacher, tmp_path):
    out = tmp_path / "lcm-lora.pt"
    subprocess.run([sys.executable, "-m", "fewstep_lab", "train", "--method", "lcm-lora", "--data", DATA, "--profile",
                    "smoke", "--steps", "4", "--teacher", str(teacher), "--out", str(out)], check=True,
                   capture_output=True)
    model, run = load_run(out, which="model")
    t_model, t_run = load_run(teacher)
    assert run.recipe.base == "edm-cfg" and run.recipe.w_min == run.recipe.w_max
    theirs, ours = t_model.state_dict(), model.net.state_dict()
    lora = {k for k in ours if ".lora_" in k}
    for k, v in theirs.items():  # frozen: the teacher's EMA weights, bit for bit, after training
        assert torch.equal(ours[k], v), k
    fresh = make_run("lcm-lora", DATA, "smoke")
    from fewstep_lab.pipeline import build_model

    untrained = build_model(run).net.state_dict()
    assert any(not torch.equal(ours[k], untrained[k]) for k in lora if ".lora_B" in k)  # B moved off zero
    assert fresh.recipe.base_recipe == ""  # filled in from the teacher
    trainable, total = count_trainable(build_model(run))
    print(f"trainable fraction {trainable / total:.3f} ({trainable} of {total})")
    assert 0 < trainable / total < 0.2
    labels = torch.arange(12) % 4
    for steps in (1, 2, 4):
        x = sample(model, run, 12, steps=steps, cond=labels)
        assert x.shape == (12, 2) and torch.isfinite(x).all()


def test_combination_in_four_steps_and_lambda_zero_is_the_wrapped_teacher(teacher, tmp_path):
    acc_run = make_run("lcm-lora", DATA, "smoke", steps=3)
    train_run(acc_run, teacher=teacher, checkpoint_path=tmp_path / "acc.pt", progress=False)
    style_run = make_run("lora", DATA + "-inner", "smoke", steps=3)
    style, _ = train_run(style_run, teacher=teacher, checkpoint_path=tmp_path / "style.pt", progress=False)
    srun = style.fewstep_run
    assert srun.recipe.base == "edm-cfg" and srun.data_recipe.dataset == DATA + "-inner"
    x = sample(style, srun, 8, steps=3, cond=torch.arange(8) % 4)  # sampled as the teacher is (Heun)
    assert torch.isfinite(x).all()
    acc, sty = export_adapter(tmp_path / "acc.pt"), export_adapter(tmp_path / "style.pt", tmp_path / "s.safetensors")
    assert read_adapter_meta(acc)["kind"] == "acceleration" and read_adapter_meta(sty)["kind"] == "style"
    t_model, _ = load_run(teacher)
    both = combine(teacher, [(acc, 1.0), (sty, 0.8)])
    assert isinstance(both, LCMBoundary) and both.adapter_names == ["acc", "style"]
    run = load_run(tmp_path / "acc.pt")[1]
    labels = torch.arange(16) % 4
    out = sample(both, run, 16, steps=4, cond=labels)
    assert out.shape == (16, 2) and torch.isfinite(out).all()
    off = combine(t_model, [(acc, 0.0), (sty, 0.0)])
    wrapped = LCMBoundary(copy.deepcopy(t_model), sigma_min=run.recipe.sigma_min)
    assert torch.equal(sample(off, run, 16, steps=4, cond=labels), sample(wrapped, run, 16, steps=4, cond=labels))
    set_scale(off, "acc", 1.0)
    acc_only = load_run(tmp_path / "acc.pt")[0]
    assert torch.allclose(sample(off, run, 16, steps=4, cond=labels), sample(acc_only, run, 16, steps=4, cond=labels),
                          atol=1e-5)
    assert all(not p.requires_grad for p in both.parameters())
    with pytest.raises(ValueError, match="adapts a edm-cfg model"):
        combine(tmp_path / "acc.pt", [(acc, 1.0)])  # an lcm-lora run is no base for its own adapter
    assert torch.equal(load_run(teacher)[0].net.inp.weight, t_model.net.inp.weight)  # the base is copied, not changed


def test_style_lora_refuses_another_domain_and_lcm_lora_needs_a_network_teacher(teacher):
    with pytest.raises(ValueError, match="network to adapt"):
        train_run(make_run("lcm-lora", DATA, "smoke", steps=2), teacher="exact", progress=False)
    with pytest.raises(ValueError, match="other data"):
        train_run(make_run("lcm", DATA + "-inner", "smoke", steps=2), teacher=teacher, progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        train_run(make_run("lora", DATA + "-inner", "smoke", steps=2, hidden=64), teacher=teacher, progress=False)
    assert isinstance(next(iter(lora_layers(_with_lora(_unet())).values())), LoRALayer)


def _with_lora(net):
    inject_lora(net, 2)
    return net


def test_style_lora_on_the_cifar10_unet_from_a_model_of_all_classes(tmp_path):
    """Convolutions end to end: an unconditional EDM U-Net of all classes (the shipped sample), a LoRA on one class."""
    base = make_run("edm", "cifar10", "smoke", steps=2)
    train_run(base, checkpoint_path=tmp_path / "edm.pt", progress=False)
    run = make_run("lora", "cifar10", "smoke", steps=3, classes=("cat",))
    model, _ = train_run(run, teacher=tmp_path / "edm.pt", checkpoint_path=tmp_path / "cat.pt", progress=False)
    assert model.fewstep_run.recipe.base_recipe != "" and model.fewstep_run.recipe.base == "edm"
    convs = [m for m in lora_layers(model).values() if m.conv]
    assert {tuple(m.weight.shape[2:]) for m in convs} >= {(3, 3), (1, 1)}
    adapter = export_adapter(tmp_path / "cat.pt")
    teacher, _ = load_run(tmp_path / "edm.pt")
    n_model = sum(v.numel() for v in teacher.state_dict().values())
    assert adapter.stat().st_size < 0.3 * 4 * n_model
    both = combine(teacher, [(adapter, 1.0)])
    assert torch.equal(sample(both, run, 2, steps=2), sample(model, run, 2, steps=2))


def test_lcm_lora_of_a_discrete_time_eps_teacher(tmp_path):
    """A class-conditional DDPM teacher (a stand-in for ddpm-cfg, registered here): the student wraps the
    teacher's DiscreteEpsDenoiser, takes its noise scale, trains inside its sigma range, and f(x, sigma_min) = x."""
    from fewstep_lab.losses.denoising import ddpm_loss
    from fewstep_lab.methods import register, unregister
    from fewstep_lab.methods.diffusion import DDPM
    from fewstep_lab.methods.guided import drop_labels
    from fewstep_lab.precond import DiscreteEpsDenoiser

    class DDPMCFG(DDPM):
        name, needs_labels = "ddpm-cfg-test", True

        def loss(self, recipe, teacher):
            def loss_fn(model, batch, ctx):
                x0, labels = batch
                labels = drop_labels(labels, 0.2, 4, ctx.generator)
                return ddpm_loss(model.eps_model, x0, model.schedule.alphas_cumprod, generator=ctx.generator,
                                 cond=labels)
            return loss_fn

    register(DDPMCFG())
    try:
        train_run(make_run("ddpm-cfg-test", DATA, "smoke", steps=3, num_timesteps=100),
                  checkpoint_path=tmp_path / "t.pt", progress=False)
        model, _ = train_run(make_run("lcm-lora", DATA, "smoke", steps=2), teacher=tmp_path / "t.pt",
                             checkpoint_path=tmp_path / "s.pt", progress=False)
        loaded, run = load_run(tmp_path / "s.pt")
        teacher, _ = load_run(tmp_path / "t.pt")
        assert isinstance(loaded.net, DiscreteEpsDenoiser) and run.recipe.base == "ddpm-cfg-test"
        assert loaded.net.eps_model.noise_scale == 4.0 / 100
        assert run.recipe.sigma_min == pytest.approx(teacher.sigma_min) and run.recipe.sigma_max == pytest.approx(
            teacher.sigma_max)
        x = torch.randn(8, 2)
        assert torch.equal(loaded(x, run.recipe.sigma_min, torch.arange(8) % 4), x)
        assert torch.isfinite(sample(loaded, run, 8, steps=4, cond=torch.arange(8) % 4)).all()
    finally:
        unregister("ddpm-cfg-test")


def test_lcm_lora_and_style_lora_on_cifar10_latent_from_a_ddpm_cfg_teacher(tmp_path, monkeypatch):
    """The latent path: ddpm-cfg teacher -> lcm-lora (its DDPM grid) and a one-class style LoRA -> combined, 2 steps."""
    import math

    from fewstep_lab import autoencoder as A
    from fewstep_lab.pipeline import default_sigmas, make_domain

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    A.train_autoencoder(A.autoencoder_recipe("smoke", steps=10), checkpoint_path=tmp_path / "ae.pt", progress=False)
    ae = {"autoencoder": str(tmp_path / "ae.pt")}
    train_run(make_run("ddpm-cfg", "cifar10-latent", "smoke", steps=3, **ae), checkpoint_path=tmp_path / "t.pt",
              progress=False)
    train_run(make_run("lcm-lora", "cifar10-latent", "smoke", steps=3, **ae), teacher=tmp_path / "t.pt",
              checkpoint_path=tmp_path / "acc.pt", progress=False)
    train_run(make_run("lora", "cifar10-latent", "smoke", steps=3, classes=("cat", "dog"), **ae),
              teacher=tmp_path / "t.pt", checkpoint_path=tmp_path / "style.pt", progress=False)
    student, run = load_run(tmp_path / "acc.pt")
    assert run.recipe.ddpm_schedule == "linear" and run.recipe.N == 1000 and student.ddpm_schedule == "linear"
    x = torch.randn(4, *make_domain(run).shape)
    assert torch.equal(student(x, run.recipe.sigma_min, torch.arange(4)), x)
    both = combine(tmp_path / "t.pt", [(export_adapter(tmp_path / "acc.pt"), 1.0),
                                       (export_adapter(tmp_path / "style.pt"), 1.0)])
    assert both.ddpm_schedule == "linear" and both.adapter_names == ["acc", "style"]
    r = make_domain(run).evaluate(both, "lcm", default_sigmas(run, 2), n=8, cond=torch.arange(8) % 10)
    assert r.nfe == 2 and math.isfinite(r.fd_mean)
