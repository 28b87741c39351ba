"""Tests for augkd.models: shapes, ranges, AnchorNet semantics, classifier heads, weight I/O."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

from augkd.models import CLASSIFIER_NAMES, AnchorNet, Encoder, Generator, build_classifier, load_state, save_state
from augkd.models.classifiers import replace_head

SHAPES = [(1, 16, 16), (3, 32, 32)]


# tiny tensors: single-threaded (see the one_thread fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("shape", SHAPES)
def test_generator_shapes_and_range(shape):
    torch.manual_seed(0)
    g = Generator(24, shape)
    with torch.no_grad():
        x = g(torch.randn(6, 24))
    assert x.shape == (6, *shape)
    assert float(x.min()) > 0 and float(x.max()) < 1
    g.eval()
    assert g(torch.randn(1, 24)).shape == (1, *shape)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 3
    with pytest.raises(ValueError, match="z"):
        g(torch.randn(2, 23))
    with pytest.raises(ValueError, match="image_shape"):
        Generator(8, (1, 18, 18))


@pytest.mark.parametrize("shape", SHAPES)
@torch.no_grad()
def test_encoder_shapes_and_clipping(shape):
    torch.manual_seed(0)
    e = Encoder(shape, num_classes=10, latent_size=12)
    x = torch.rand(5, *shape)
    y = torch.tensor([0, 1, 2, 3, 9])
    z, mu, logvar = e(x, y, return_dist=True)
    assert z.shape == mu.shape == logvar.shape == (5, 12)
    assert e(x, y).shape == (5, 12)
    assert torch.equal(e(x, y, sample=False), e(x, y, return_dist=True)[1])  # sample=False gives mu
    e.eval()
    assert not torch.equal(e(x, y), e(x, y))  # samples in eval mode too (official B11)
    # init: U(-0.08, 0.08) weights, zero biases
    assert float(e.fc_mu.weight.detach().abs().max()) <= 0.08 and float(e.fc_mu.bias.detach().abs().max()) == 0
    # logvar clip and eps clip: blow up the head and check bounds
    e.fc_logvar.bias.fill_(50.0)
    e.fc_mu.bias.zero_()
    _, mu, logvar = e(x, y, return_dist=True)
    assert float(logvar.max()) <= 3.0
    e.fc_logvar.bias.fill_(-50.0)
    _, _, logvar = e(x, y, return_dist=True)
    assert float(logvar.min()) >= -5.0
    e.fc_logvar.bias.fill_(50.0)
    z, mu, _ = e(x, y, return_dist=True)
    assert float((z - mu).abs().max()) <= 10.0 * torch.exp(torch.tensor(1.5)) + 1e-4
    # soft labels and one-hot rows are accepted; bad labels are refused
    assert e(x, torch.eye(10)[y]).shape == (5, 12)
    with pytest.raises(ValueError, match="y"):
        e(x, torch.tensor([0, 1, 2, 3, 10]))
    with pytest.raises(ValueError, match="x"):
        e(torch.rand(5, 2, 8, 8), y)


def test_encoder_scales_bound_per_layer():
    e = Encoder((1, 16, 16), 10, 8, hidden_dims=(8, 8, 8), scales=(0.5, 1.0))
    assert [m.scale for m in e.modules() if hasattr(m, "scale")] == [0.5, 1.0]
    assert e(torch.rand(2, 1, 16, 16), torch.tensor([1, 2])).shape == (2, 8)


@pytest.mark.parametrize("mode,upper", [("official", 1 / 3), ("sigmoid", 1.0)])
@torch.no_grad()
def test_anchor_mask_range_and_formula(mode, upper):
    torch.manual_seed(0)
    a = AnchorNet(16, 5, mask=mode)
    z = torch.randn(40, 16)
    y = torch.arange(40) % 5
    z_a, m = a(z, y)
    assert z_a.shape == m.shape == (40, 16)
    assert float(m.min()) >= 0 and float(m.max()) < upper
    m2, p = a.mask_and_psi(z, y)
    assert torch.allclose(m, m2)
    assert torch.allclose(z_a, m * p + (1 - m) * z, atol=1e-6)
    # psi really sees m * z
    assert torch.allclose(p, a.psi(m * z), atol=1e-6)
    # class-specific: in eval mode the mask depends on y only
    a.eval()
    z_a, m = a(z, y)
    for c in range(5):
        rows = m[y == c]
        assert torch.allclose(rows, rows[:1].expand_as(rows))
    assert not torch.allclose(m[0], m[1])
    assert torch.allclose(z_a, m * a.psi(m * z) + (1 - m) * z, atol=1e-6)


def test_anchor_gradients_and_errors():
    a = AnchorNet(8, 3)
    z = torch.randn(6, 8, requires_grad=True)
    z_a, m = a(z, torch.tensor([0, 1, 2, 0, 1, 2]))
    (z_a.sum() + m.sum()).backward()
    assert z.grad is not None and a.embed.weight.grad is not None
    assert float(a.embed.bias.detach().abs().max()) == 0
    with pytest.raises(ValueError, match="mask"):
        AnchorNet(8, 3, mask="tanh")
    with pytest.raises(ValueError, match="z"):
        a(torch.randn(6, 9), torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("name", CLASSIFIER_NAMES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 30, 30)])
def test_small_cnns(name, shape):
    model = build_classifier(name, num_classes=7, in_channels=shape[0], image_size=shape[1])
    assert model(torch.rand(4, *shape)).shape == (4, 7)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_student_smaller_than_teacher():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_classifier("cnn-student", 10, 1, 16)) * 3 < count(build_classifier("cnn-teacher", 10, 1, 16))


def test_build_classifier_errors():
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("cnn-teacher", 0, 1, 16)
    with pytest.raises(ValueError, match="pretrained"):
        build_classifier("cnn-student", 10, 1, 16, pretrained=True)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="pip install torchvision"):
            build_classifier("resnet18", 10, 3, 32)
    else:
        with pytest.raises(ValueError, match="unknown model"):
            build_classifier("no-such-net", 10, 3, 32)


class _FcNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 1000)


class _SeqHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(6, 1000))


class _NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(6, 1000)


def test_replace_head_by_structure():
    assert replace_head(_FcNet(), 31).fc.out_features == 31
    assert replace_head(_SeqHead(), 12).classifier[-1].out_features == 12
    with pytest.raises(ValueError, match="classification head"):
        replace_head(_NoHead(), 5)


@pytest.mark.parametrize("where", ["classifier", "heads.head", "head", "head[-1]", "fc-not-linear"])
def test_replace_head_at_every_place_it_looks(where):
    m = nn.Module()
    old = nn.Linear(6, 1000, bias=False)
    if where == "classifier":
        m.classifier = old
    elif where == "heads.head":
        m.heads = nn.Sequential()
        m.heads.head = old
    elif where == "head":
        m.head = old
    elif where == "head[-1]":
        m.head = nn.Sequential(nn.Identity(), old)
    else:  # an fc that is no Linear layer is passed over
        m.fc, m.classifier = nn.Identity(), old
    replace_head(m, 7)
    new = {"classifier": lambda: m.classifier, "heads.head": lambda: m.heads.head, "head": lambda: m.head,
           "head[-1]": lambda: m.head[-1], "fc-not-linear": lambda: m.classifier}[where]()
    assert isinstance(new, nn.Linear) and new is not old
    assert (new.in_features, new.out_features, new.bias) == (6, 7, None)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
def test_torchvision_heads():
    for name in ("resnet18", "mobilenet_v3_small"):
        m = build_classifier(name, 31, 1, 32)
        assert m.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 31)


# ---------------------------------------------------------------- weight I/O

def _teacher(k=10):
    torch.manual_seed(k)
    return build_classifier("cnn-teacher", k, 1, 16)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_save_load_roundtrip(tmp_path, suffix):
    src, dst = _teacher(), build_classifier("cnn-teacher", 10, 1, 16)
    path = tmp_path / f"sub/teacher{suffix}"
    save_state(src, path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    load_state(dst, path)
    for (k, v), (_, w) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(v, w), k
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_load_wrapped_and_dataparallel(tmp_path):
    src = _teacher()
    torch.save({"epoch": 3, "state_dict": src.state_dict()}, tmp_path / "a.pt")
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        dst = build_classifier("cnn-teacher", 10, 1, 16)
        load_state(dst, tmp_path / name)
        assert torch.equal(dst.fc.weight, src.fc.weight)


def test_load_mismatches(tmp_path):
    save_state(_teacher(31), tmp_path / "t31.pt")
    with pytest.raises(ValueError, match="teacher has 31 classes but the data has 10"):
        load_state(build_classifier("cnn-teacher", 10, 1, 16), tmp_path / "t31.pt")
    save_state(_teacher(10), tmp_path / "t10.safetensors")
    with pytest.raises(ValueError, match="missing keys|unexpected keys|shape"):
        load_state(build_classifier("cnn-student", 10, 1, 16), tmp_path / "t10.safetensors")
    sd = _teacher().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["features.0.bias"]
    torch.save(sd, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"missing keys: features\.0\.bias.*unexpected keys: extra\.weight"):
        load_state(build_classifier("cnn-teacher", 10, 1, 16), tmp_path / "keys.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_state(build_classifier("cnn-teacher", 10, 1, 16), tmp_path / "none.pt")


class Payload:
    """An arbitrary pickled object: loading it would require running pickled code."""

    def __init__(self):
        self.weights = torch.zeros(2)


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(ValueError, match="refused to load"):
        load_state(build_classifier("cnn-teacher", 10, 1, 16), path)
    torch.save(build_classifier("cnn-teacher", 10, 1, 16), tmp_path / "module.pt")  # a whole pickled module
    with pytest.raises(ValueError, match="refused to load"):
        load_state(build_classifier("cnn-teacher", 10, 1, 16), tmp_path / "module.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="safetensors"):
        load_state(build_classifier("cnn-teacher", 10, 1, 16), tmp_path / "junk.safetensors")
