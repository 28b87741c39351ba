"""Plots look at the networks without changing them: same weights, same BatchNorm statistics, same
train/eval modes afterwards, no gradients."""
import pytest
import torch

from augkd import models
from augkd.config import build_config
from augkd.method.pipeline import build_teacher
from augkd.method.rundir import finish, prepare
from augkd.method.visuals import plot_anchor, plot_generated, plot_mixup


@pytest.fixture
def nets(tmp_path):
    cfg = build_config({"threads": 1, "device": "cpu", "data.k_shot": 2})
    ctx = prepare(cfg, str(tmp_path / "run"), quiet=True)
    shape, K, L = tuple(ctx.data.image_shape), ctx.data.num_classes, cfg.df.latent_size
    nets = {
        "teacher": build_teacher(ctx),
        "generator": models.Generator(L, shape, cfg.df.generator_hidden),
        "encoder": models.Encoder(shape, K, L, cfg.df.encoder_hidden),
        "anchor": models.AnchorNet(L, K, mask=cfg.anchor.mask),
    }
    yield ctx, nets
    finish(ctx)


def _snapshot(nets):
    return {name: ({k: v.clone() for k, v in m.state_dict().items()}, [s.training for s in m.modules()])
            for name, m in nets.items()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_plots_leave_every_network_as_it_was(nets, tmp_path, mode):
    ctx, n = nets
    for m in n.values():
        m.train(mode == "train")
    n["teacher"].eval()  # mixed modes inside one call, too
    before = _snapshot(n)
    plot_generated(ctx, str(tmp_path / "g.png"), n["generator"], n["teacher"], ctx.cfg.df.latent_size)
    plot_anchor(ctx, str(tmp_path / "a.png"), n["generator"], n["encoder"], n["anchor"], n["teacher"])
    plot_mixup(ctx, str(tmp_path / "m.png"), n["generator"], n["encoder"], n["anchor"])
    after = _snapshot(n)
    for name in n:
        (sa, ma), (sb, mb) = before[name], after[name]
        assert ma == mb, name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"
        assert all(p.grad is None for p in n[name].parameters()), name
    assert all((tmp_path / f).is_file() for f in ("g.png", "a.png", "m.png"))
