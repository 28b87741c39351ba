"""Module 3's f(e) and u(e) schedules against the released formulas."""
import pytest
import torch

from augkd.method.schedules import ce_weight, mixup_factor


@pytest.mark.parametrize("kind", ["linear", "step"])
def test_start_end_and_beyond(kind):
    E, a, b = 100, 0.6, 0.2
    assert mixup_factor(0, E, a, b, kind) == pytest.approx(b)
    assert mixup_factor(60, E, a, b, kind) == pytest.approx(1.0)  # e = a * E
    assert mixup_factor(99, E, a, b, kind) == 1.0
    assert mixup_factor(1000, E, a, b, kind) == 1.0


def test_linear_midpoint():
    # f(e) = min(1, b + (1 - b) e / (a E)): e = 30 of a E = 60 -> 0.2 + 0.8 * 0.5
    assert mixup_factor(30, 100, 0.6, 0.2, "linear") == pytest.approx(0.6)
    assert mixup_factor(59, 100, 0.6, 0.2, "linear") == pytest.approx(0.2 + 0.8 * 59 / 60)


def test_step_is_quantised_to_tenths():
    # f(e) = min(1, b + (1 - b) trunc(10 e / (a E)) / 10)
    assert mixup_factor(5, 100, 0.6, 0.2, "step") == pytest.approx(0.2)  # 10*5/60 = 0.83 -> 0
    assert mixup_factor(6, 100, 0.6, 0.2, "step") == pytest.approx(0.2 + 0.8 * 0.1)
    assert mixup_factor(35, 100, 0.6, 0.2, "step") == pytest.approx(0.2 + 0.8 * 0.5)  # 5.83 -> 5
    assert mixup_factor(59, 100, 0.6, 0.2, "step") == pytest.approx(0.2 + 0.8 * 0.9)


def test_monotone_non_decreasing():
    for kind in ("linear", "step"):
        vals = [mixup_factor(e, 40, 0.6, 0.2, kind) for e in range(40)]
        assert all(x <= y for x, y in zip(vals, vals[1:]))


def test_u_schedules():
    assert ce_weight(0.3, "tied") == pytest.approx(0.3)
    assert ce_weight(0.3, "constant", 0.5) == 0.5
    with pytest.raises(ValueError):
        ce_weight(0.3, "nope")
    with pytest.raises(ValueError):
        mixup_factor(0, 10, 0.6, 0.2, "nope")


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_adam_foreach_equals_the_per_tensor_loop_bit_for_bit(weight_decay):
    """The stages' Adam (foreach) takes exactly the steps of torch's CPU default (the per-tensor loop)."""
    from augkd import models
    from augkd.method.schedules import adam

    torch.manual_seed(0)
    nets = [models.build_classifier("cnn-student", 10, 1, 16) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [adam(nets[0].parameters(), 1e-3, weight_decay),
            torch.optim.Adam(nets[1].parameters(), lr=1e-3, weight_decay=weight_decay, foreach=False)]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g) * 10 for p in nets[0].parameters()]
        for net, opt in zip(nets, opts):
            for p, gr in zip(net.parameters(), grads):
                p.grad = gr.clone()
            opt.step()
    assert opts[0].param_groups[0]["foreach"] is True
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
