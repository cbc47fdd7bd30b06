import random

import numpy as np
import pytest
import torch

from labkit import device


def test_bad_device_string_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="allowed"):
        device.get_device("gpu0")
    with pytest.raises(ValueError, match="allowed"):
        device.get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            device.get_device("cuda")
    monkeypatch.setenv(device.ENV_VAR, "cpu")
    assert device.get_device() == torch.device("cpu")
    monkeypatch.setenv(device.ENV_VAR, "banana")
    with pytest.raises(ValueError, match="banana"):
        device.get_device()


def test_seed_everything_seeds_every_rng():
    device.seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    device.seed_everything(5)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())
    with pytest.raises(ValueError, match="seed"):
        device.seed_everything(-1)


def test_doctor_prints_what_to_expect(capsys):
    info = device.doctor()
    out = capsys.readouterr().out
    for key in ("torch", "cpu_cores", "memory_gib", "gpu", "triton_installed", "expect"):
        assert key in info and key in out
