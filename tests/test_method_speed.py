"""The pieces that make the job fast keep its numbers: per-epoch sums read once equal the per-step
.item() sums bit for bit; the background writer writes every job, in order, from snapshots the
training cannot change, and hands its errors back; the cached normalisation equals the plain one."""
import os
import threading

import pytest
import torch

from augkd.data import normalize
from augkd.method.background import BackgroundWriter, snapshot
from augkd.method.step_sums import StepSums


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_step_sums_equal_item_sums_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    values = [(torch.randn((), generator=g) * 10 ** torch.randint(-3, 4, (), generator=g)).to(dtype)
              for _ in range(500)]
    scales = [int(s) for s in torch.randint(1, 300, (500,), generator=g)]
    steps = StepSums()
    want: dict[str, float] = {}
    for i, (v, b) in enumerate(zip(values, scales)):
        key = "ab"[i % 2]
        steps.add(key, v, b)
        want[key] = want.get(key, 0.0) + v.item() * b
    got = steps.sums()
    assert got == want  # exact, not approximately
    assert steps.counts == {"a": 250, "b": 250}
    assert StepSums().sums() == {}


def test_step_sums_keep_no_graph():
    w = torch.ones((), requires_grad=True)
    steps = StepSums()
    steps.add("loss", w * 3)
    assert not steps._values[0].requires_grad
    assert steps.sums() == {"loss": 3.0}


def test_snapshot_is_not_reached_by_later_in_place_changes():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    live = {"model": model.state_dict(), "opt": opt.state_dict(), "history": [{"loss": 1.0}]}
    snap = snapshot(live)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # changes the weights and Adam's moments in place
    live["history"].append({"loss": 2.0})
    for k, v in before.items():
        assert torch.equal(snap["model"][k], v)
    assert torch.equal(snap["opt"]["state"][0]["exp_avg"], exp_avg)
    assert not torch.equal(snap["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert snap["history"] == [{"loss": 1.0}]


def _rebuilt(obj):
    """The snapshot rule without shortcuts: every container rebuilt, every tensor copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _rebuilt(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuilt(v) for v in obj)
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_snapshot_of_plain_containers_equals_a_full_rebuild_and_stays_apart():
    """The one-step copies of flat containers (metrics rows, RNG tuples, index lists) give what rebuilding
    every element gives, and later changes to the live containers do not reach them."""
    import random

    live = {
        "row": {"epoch": 3, "loss": 0.25, "name": "x", "flag": True, "none": None},
        "rows": [{"a": 1.5}, {"a": 2.5}],
        "indices": list(range(50)),
        "python_rng": random.getstate(),  # (version, 625 ints, gauss)
        "mixed": (1, [2, 3], torch.ones(2)),
        "tensors": [torch.arange(3.0), {"w": torch.zeros(2)}],
    }
    want = _rebuilt(live)
    snap = snapshot(live)
    assert _same(snap, want)
    assert snap["row"] is not live["row"] and snap["indices"] is not live["indices"]
    assert snap["rows"][0] is not live["rows"][0]
    live["row"]["loss"] = 9.0
    live["rows"][0]["a"] = 9.0
    live["indices"].append(50)
    live["mixed"][1].append(4)
    live["tensors"][0].add_(1)
    live["tensors"][1]["w"].add_(1)
    assert _same(snap, want)


def test_loop_snapshot_shares_only_what_the_loop_keeps_unchanged():
    from augkd.method.loop import _snapshot_state

    splits, rows = {"student": [1, 2, 3]}, [{"epoch": 0}]
    state = {"epoch": 0, "objects": {"w": torch.ones(2)}, "history": rows, "splits": splits}
    snap = _snapshot_state(state, {"splits": splits, "history": rows})
    assert list(snap) == list(state)
    assert snap["splits"] is splits and snap["history"] is rows
    state["objects"]["w"].add_(1)
    assert torch.equal(snap["objects"]["w"], torch.ones(2))
    assert _snapshot_state(None, {}) is None


def test_background_writer_runs_jobs_in_order_and_one_at_a_time(tmp_path):
    writer = BackgroundWriter()
    order, running = [], []
    lock = threading.Lock()

    def job(i):
        def run():
            with lock:
                running.append(i)
                assert len(running) == 1  # never two in flight
            (tmp_path / f"{i}.txt").write_text(str(i))
            order.append(i)
            with lock:
                running.remove(i)
        return run

    for i in range(20):
        writer.submit(job(i))
    writer.wait()
    assert order == list(range(20))
    assert sorted(os.listdir(tmp_path)) == sorted(f"{i}.txt" for i in range(20))


@pytest.mark.parametrize("enabled", [True, False])
def test_background_writer_hands_errors_back(enabled):
    writer = BackgroundWriter(enabled=enabled)

    def fail():
        raise OSError("disk full")

    if enabled:
        writer.submit(fail)
        with pytest.raises(OSError, match="disk full"):
            writer.wait()
        writer.wait()  # reported once
    else:
        with pytest.raises(OSError, match="disk full"):
            writer.submit(fail)


def test_background_writer_reports_a_failed_job_at_the_next_submit():
    writer = BackgroundWriter()
    writer.submit(lambda: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError, match="no space"):
        writer.submit(lambda: None)


def test_context_normalize_equals_the_plain_one(tmp_path):
    from augkd.config import build_config
    from augkd.method.context import Context

    class Data:
        mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)

    ctx = Context(cfg=build_config({}), device=torch.device("cpu"), data=Data(), run_dir=str(tmp_path), log=None)
    x = torch.rand(5, 3, 4, 4)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x.double()):
        assert torch.equal(ctx.normalize(inp), normalize(inp, Data.mean, Data.std))
    with torch.inference_mode():  # first use inside an evaluation: the cached tensors stay ordinary
        ctx2 = Context(cfg=build_config({}), device=torch.device("cpu"), data=Data(), run_dir=str(tmp_path), log=None)
        ctx2.normalize(x)
    y = ctx2.normalize(x.clone().requires_grad_())
    y.sum().backward()  # would raise "Inference tensors cannot be saved for backward"
    with pytest.raises(ValueError):
        ctx.normalize(torch.rand(5, 2, 4, 4))  # wrong channel count: the plain function's error


def test_a_run_turns_the_nan_fill_off_and_finish_puts_it_back():
    import logging
    from types import SimpleNamespace

    from augkd.config import build_config
    from augkd.method.rundir import configure_torch, finish

    before = torch.utils.deterministic.fill_uninitialized_memory
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.utils.deterministic.fill_uninitialized_memory = True
        configure_torch(build_config({"threads": torch.get_num_threads()}), torch.device("cpu"))
        assert torch.utils.deterministic.fill_uninitialized_memory is False  # the run's speed setting
        finish(SimpleNamespace(log=logging.getLogger("augkd.test.fill"), lock=None))
        assert torch.utils.deterministic.fill_uninitialized_memory is True
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before
        torch.use_deterministic_algorithms(deterministic)


def test_channels_last_generator_converts_once_and_keeps_its_numbers():
    """A channels-last G hands its convolutions channels-last maps (no per-layer conversion of the
    upsampled map) and computes exactly what it computed when each layer converted for itself."""
    from augkd import models

    torch.manual_seed(0)
    G = models.Generator(8, (1, 16, 16), [16, 8]).to(memory_format=torch.channels_last)
    z, grad_out = torch.randn(6, 8), torch.randn(6, 1, 16, 16)
    seen = []
    convs = [m for m in G.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())) for c in convs]
    out = G(z)
    (out * grad_out).sum().backward()
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    grads = [p.grad.clone() for p in G.parameters()]

    def layer_by_layer(z):  # the plain Sequential on the NCHW view
        return G.net(G.fc(z).view(z.shape[0], G._dims0, *G.init_hw))

    G.zero_grad()
    want = layer_by_layer(z)
    (want * grad_out).sum().backward()
    assert torch.equal(out, want)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, G.parameters()))
