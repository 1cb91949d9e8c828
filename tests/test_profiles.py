"""Profile and device selection (fewstep_lab/profiles.py)."""

import pytest
import torch

from fewstep_lab import profiles
from fewstep_lab.profiles import PROFILES, default_device, get_device, get_profile


def test_profiles_are_the_three_sizes():
    assert PROFILES == ("smoke", "cpu", "gpu")


@pytest.mark.parametrize("name", PROFILES)
def test_argument_wins_over_environment(name, monkeypatch):
    monkeypatch.setenv("FEWSTEP_PROFILE", "cpu" if name != "cpu" else "smoke")
    assert get_profile(name) == name


def test_argument_is_case_and_space_insensitive():
    assert get_profile(" GPU ") == "gpu"


def test_environment_variable_is_used(monkeypatch):
    monkeypatch.setenv("FEWSTEP_PROFILE", "smoke")
    assert get_profile() == "smoke"


@pytest.mark.parametrize("cuda", [True, False])
def test_default_follows_cuda(cuda, monkeypatch):
    monkeypatch.delenv("FEWSTEP_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert get_profile() == ("gpu" if cuda else "cpu")


def test_empty_environment_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("FEWSTEP_PROFILE", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile() == "cpu"


def test_unknown_argument_names_valid_profiles():
    with pytest.raises(ValueError) as info:
        get_profile("fast")
    message = str(info.value)
    assert "'fast'" in message and "FEWSTEP_PROFILE" in message
    assert all(repr(p) in message for p in PROFILES)


def test_unknown_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FEWSTEP_PROFILE", "huge")
    with pytest.raises(ValueError, match="'huge'.*environment variable FEWSTEP_PROFILE"):
        get_profile()


def test_default_device_order(monkeypatch):
    mps = torch.backends.mps
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mps, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("mps")
    monkeypatch.setattr(mps, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


def test_get_device_argument_then_environment_then_default(monkeypatch):
    monkeypatch.setattr(profiles, "default_device", lambda: torch.device("cpu"))
    monkeypatch.delenv("FEWSTEP_DEVICE", raising=False)
    assert get_device() == torch.device("cpu")
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("FEWSTEP_DEVICE", "meta")
    assert get_device() == torch.device("meta")
    assert get_device("cpu") == torch.device("cpu")


def test_get_device_rejects_garbage_and_missing_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="unknown device 'toaster'"):
        get_device("toaster")
    with pytest.raises(ValueError, match="needs CUDA"):
        get_device("cuda")
    monkeypatch.setenv("FEWSTEP_DEVICE", "cuda:0")
    with pytest.raises(ValueError, match="environment variable FEWSTEP_DEVICE"):
        get_device()
