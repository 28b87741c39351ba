"""FlatAdam (the stages' Adam) takes exactly the steps of torch's CPU Adam, bit for bit, and really takes
them in its flat form; its state stays torch's (layouts, state_dict, loading either way)."""
import io

import pytest
import torch

from augkd import models
from augkd.method.flat_adam import FlatAdam


def _nets(n: int):
    """Copies of one encoder (20 tensors from 1 to 32,768 elements, channels-last convolutions)."""
    torch.manual_seed(0)
    first = models.Encoder((1, 16, 16), 10, 32, (16, 32, 64)).to(memory_format=torch.channels_last)
    out = [first]
    for _ in range(n - 1):
        net = models.Encoder((1, 16, 16), 10, 32, (16, 32, 64)).to(memory_format=torch.channels_last)
        net.load_state_dict(first.state_dict())
        out.append(net)
    return out


def _grads(net, g: torch.Generator, step: int):
    grads = []
    for i, p in enumerate(net.parameters()):
        scale = 10.0 ** float(torch.randint(-4, 3, (), generator=g))
        gr = torch.randn(p.shape, generator=g) * scale
        if (step + i) % 7 == 0:
            gr.zero_()  # exact zeros, as a dead unit gives
        if p.dim() == 4:
            gr = gr.contiguous(memory_format=torch.channels_last)
        grads.append(gr)
    return grads


def _set(net, grads, skip: int | None = None):
    for i, (p, gr) in enumerate(zip(net.parameters(), grads)):
        p.grad = None if i == skip else gr.clone(memory_format=torch.preserve_format)


def _assert_same(nets, opts):
    ref_net, ref_opt = nets[-1], opts[-1]
    for net, opt in zip(nets[:-1], opts[:-1]):
        for p, q in zip(net.parameters(), ref_net.parameters()):
            assert torch.equal(p, q)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key


def _is_flat(opt) -> bool:
    """Whether the state's first moments all live in one buffer (the flat step's)."""
    ptrs = {opt.state[p]["exp_avg"].untyped_storage().data_ptr() for p in opt.param_groups[0]["params"]}
    return len(ptrs) == 1


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_flat_adam_equals_torch_adam_bit_for_bit(weight_decay):
    nets = _nets(3)
    opts = [FlatAdam(nets[0].parameters(), lr=1e-3, weight_decay=weight_decay),
            torch.optim.Adam(nets[1].parameters(), lr=1e-3, weight_decay=weight_decay, foreach=True),
            torch.optim.Adam(nets[2].parameters(), lr=1e-3, weight_decay=weight_decay, foreach=False)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7) for o in opts]
    g = torch.Generator().manual_seed(1)
    for step in range(60):
        grads = _grads(nets[0], g, step)
        for net, opt, sched in zip(nets, opts, scheds):
            _set(net, grads)
            opt.step()
            if step % 5 == 4:
                sched.step()  # the learning rate changes between steps
    assert _is_flat(opts[0])
    _assert_same(nets, opts)


def test_flat_adam_state_keeps_torch_layouts_and_format():
    nets = _nets(2)
    opts = [FlatAdam(nets[0].parameters()), torch.optim.Adam(nets[1].parameters(), foreach=True)]
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        grads = _grads(nets[0], g, step)
        for net, opt in zip(nets, opts):
            _set(net, grads)
            opt.step()
    assert _is_flat(opts[0])
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opts[0].state[p][key].stride() == opts[1].state[q][key].stride()
    a, b = opts[0].state_dict(), opts[1].state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()


def test_flat_adam_falls_back_for_a_missing_gradient_and_continues_exactly():
    nets = _nets(2)
    opts = [FlatAdam(nets[0].parameters(), weight_decay=1e-4),
            torch.optim.Adam(nets[1].parameters(), weight_decay=1e-4, foreach=False)]
    g = torch.Generator().manual_seed(3)
    for step in range(12):
        grads = _grads(nets[0], g, step)
        skip = 3 if step in (4, 5) else None  # one tensor without a gradient: its step count lags
        for net, opt in zip(nets, opts):
            _set(net, grads, skip)
            opt.step()
    _assert_same(nets, opts)
    # unequal step counts from here on: torch's step throughout, still the same numbers
    assert len({int(s["step"]) for s in opts[0].state.values()}) == 2


def test_flat_adam_state_dict_round_trips_both_ways():
    nets = _nets(4)
    opts = [FlatAdam(nets[0].parameters(), weight_decay=1e-4),
            torch.optim.Adam(nets[1].parameters(), weight_decay=1e-4, foreach=False)]
    g = torch.Generator().manual_seed(4)

    def run(pairs, steps):
        for step in range(steps):
            grads = _grads(pairs[0][0], g, step)
            for net, opt in pairs:
                _set(net, grads)
                opt.step()

    run(list(zip(nets[:2], opts)), 6)

    def reload(state):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    # a checkpoint of FlatAdam continues in torch's Adam, and one of torch's Adam in FlatAdam
    nets[2].load_state_dict(nets[0].state_dict())
    nets[3].load_state_dict(nets[1].state_dict())
    opt2 = torch.optim.Adam(nets[2].parameters(), weight_decay=1e-4, foreach=False)
    opt2.load_state_dict(reload(opts[0].state_dict()))
    opt3 = FlatAdam(nets[3].parameters(), weight_decay=1e-4)
    opt3.load_state_dict(reload(opts[1].state_dict()))
    opts[0].load_state_dict(reload(opts[0].state_dict()))  # its own, reloaded: the buffers are remade
    run([(nets[0], opts[0]), (nets[1], opts[1]), (nets[2], opt2), (nets[3], opt3)], 6)
    assert _is_flat(opts[0]) and _is_flat(opt3)
    _assert_same([nets[0], nets[2], nets[3], nets[1]], [opts[0], opt2, opt3, opts[1]])
