"""The steps' independent halves side by side (method/side_thread.py) give the serial order's numbers bit
for bit: Module 1's encoder step beside the student's (weights, BN buffers, optimiser state, every
epoch's metrics, the random stream after) and Module 3's teacher forward beside the student's."""
import threading

import pytest
import torch

from augkd import models
from augkd.config import build_config
from augkd.method import data_free, mixup, side_thread
from augkd.method.rundir import finish, prepare

SMALL = {
    "threads": 1, "plots": False, "device": "cpu", "df.epochs": 2, "df.iters_per_epoch": 2, "df.batch_size": 16,
    "df.student_steps": 3, "df.val_batches": 1, "data.k_shot": 2,
}


def _start(tmp_path, name: str, serial: bool, monkeypatch, overrides=None):
    """A prepared run and its four networks (seeded), with the worker forced on or off."""
    monkeypatch.setenv(side_thread.SIDE_THREAD_ENV, "0" if serial else "1")
    monkeypatch.setattr(side_thread.os, "cpu_count", lambda: 4)  # a core to spare, whatever runs the test
    cfg = build_config({**SMALL, **(overrides or {})})
    ctx = prepare(cfg, str(tmp_path / name), quiet=True)
    shape, k, latent = tuple(ctx.data.image_shape), ctx.data.num_classes, cfg.df.latent_size
    torch.manual_seed(0)
    T = ctx.place(models.build_classifier(cfg.teacher.arch, k, shape[0], shape[1]))
    G = ctx.place(models.Generator(latent, shape, cfg.df.generator_hidden))
    E = ctx.place(models.Encoder(shape, k, latent, cfg.df.encoder_hidden))
    S = ctx.place(models.build_classifier(cfg.student.arch, k, shape[0], shape[1]))
    return cfg, ctx, (T, G, E, S)


def _run(tmp_path, name: str, serial: bool, monkeypatch, seen: set):
    cfg, ctx, (T, G, E, S) = _start(tmp_path, name, serial, monkeypatch)
    try:
        E.register_forward_pre_hook(lambda m, a: seen.add(threading.current_thread().name))
        states = {}
        original = data_free.setup

        def keep(*args):
            st = original(*args)
            states["st"] = st
            return st

        monkeypatch.setattr(data_free, "setup", keep)
        result = data_free.run_data_free(ctx, T, G, E, S)
        st = states["st"]
        nets = {"G": G.state_dict(), "E": E.state_dict(), "S": S.state_dict()}
        opts = {n: o.state_dict()["state"] for n, o in (("g", st.opt_g), ("s", st.opt_s), ("e", st.opt_e))}
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
        return nets, opts, history, st.noise.get_state(), st.worker
    finally:
        finish(ctx)


def _serial_and_worker(run, tmp_path, monkeypatch, thread_prefix: str):
    """``run`` in the serial order and with the worker; the worker's thread ran a hooked forward only in the
    second."""
    serial_threads, worker_threads = set(), set()
    a = run(tmp_path, "serial", True, monkeypatch, serial_threads)
    b = run(tmp_path, "worker", False, monkeypatch, worker_threads)
    assert any(n.startswith(thread_prefix) for n in worker_threads)  # the training steps used it
    assert not any(n.startswith(thread_prefix) for n in serial_threads)
    return a, b


def test_encoder_worker_keeps_every_number_of_the_serial_order(tmp_path, monkeypatch):
    a, b = _serial_and_worker(_run, tmp_path, monkeypatch, "augkd-df-encoder")
    assert a[4] is None and b[4] is not None
    for net in a[0]:
        for key, value in a[0][net].items():
            assert torch.equal(value, b[0][net][key]), (net, key)
    for opt in a[1]:
        for index, state in a[1][opt].items():
            for key, value in state.items():
                assert torch.equal(value, b[1][opt][index][key]), (opt, index, key)
    assert a[2] == b[2]  # every epoch's metrics, exactly
    assert torch.equal(a[3], b[3])  # the noise stream is where the serial order leaves it


def test_encoder_worker_only_where_it_can_help(tmp_path, monkeypatch):
    cfg = build_config(SMALL)
    ctx = prepare(cfg, str(tmp_path / "run"), quiet=True)
    try:
        threads = torch.get_num_threads()

        def worker_with(cores: int, setting: str | None) -> bool:
            monkeypatch.setattr(side_thread.os, "cpu_count", lambda: cores)
            if setting is None:
                monkeypatch.delenv(side_thread.SIDE_THREAD_ENV, raising=False)
            else:
                monkeypatch.setenv(side_thread.SIDE_THREAD_ENV, setting)
            worker = side_thread.side_worker(ctx, "df-encoder")
            if worker is None:
                return False
            assert worker.submit(torch.get_num_threads).result() == threads  # the run's thread count
            worker.shutdown()
            return True

        # unset: on where the intra-op threads leave as many cores idle as they use
        assert worker_with(2 * threads, None) and not worker_with(2 * threads - 1, None)
        # 1: wherever one core is left; 0: never
        assert worker_with(threads + 1, "1") and not worker_with(threads, "1")
        assert not worker_with(64 * threads, "0")
        with pytest.raises(ValueError, match="AUGKD_SIDE_THREAD"):
            worker_with(4 * threads, "yes")
    finally:
        finish(ctx)


def test_an_error_in_the_student_step_waits_for_the_encoder_step(tmp_path, monkeypatch):
    cfg = build_config(SMALL)
    ctx = prepare(cfg, str(tmp_path / "run"), quiet=True)
    monkeypatch.setattr(side_thread.os, "cpu_count", lambda: 4)
    monkeypatch.setenv(side_thread.SIDE_THREAD_ENV, "1")
    try:
        shape, k, latent = tuple(ctx.data.image_shape), ctx.data.num_classes, cfg.df.latent_size
        T = models.build_classifier(cfg.teacher.arch, k, shape[0], shape[1])
        G = models.Generator(latent, shape, cfg.df.generator_hidden)
        E = models.Encoder(shape, k, latent, cfg.df.encoder_hidden)
        S = models.build_classifier(cfg.student.arch, k, shape[0], shape[1])
        st = data_free.setup(ctx, T, G, E, S)
        finished = threading.Event()
        real_encoder_step = data_free._encoder_step

        def slow_encoder_step(*args):
            out = real_encoder_step(*args)
            finished.set()
            return out

        def failing_student_step(*args):
            raise RuntimeError("student step failed")

        monkeypatch.setattr(data_free, "_encoder_step", slow_encoder_step)
        monkeypatch.setattr(data_free, "_student_step", failing_student_step)
        with pytest.raises(RuntimeError, match="student step failed"):
            data_free.student_encoder_step(st)
        assert finished.is_set()
        st.worker.shutdown()
        st.hooks.remove()
    finally:
        finish(ctx)


def _run_mixup(tmp_path, name: str, serial: bool, monkeypatch, seen: set):
    cfg, ctx, (T, G, E, S) = _start(tmp_path, name, serial, monkeypatch, {"mixup.epochs": 3})
    try:
        A = models.AnchorNet(cfg.df.latent_size, ctx.data.num_classes, mask=cfg.anchor.mask)
        T.register_forward_pre_hook(lambda m, a: seen.add(threading.current_thread().name))
        result = mixup.run_mixup(ctx, T, S, G, E, A)
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
        return S.state_dict(), history
    finally:
        finish(ctx)


def test_mixup_teacher_forward_beside_the_student_keeps_every_number(tmp_path, monkeypatch):
    a, b = _serial_and_worker(_run_mixup, tmp_path, monkeypatch, "augkd-mixup-teacher")
    for key, value in a[0].items():
        assert torch.equal(value, b[0][key]), key
    assert a[1] == b[1]


def test_beside_runs_both_in_order_without_a_worker_and_returns_main_first():
    order = []
    assert side_thread.beside(None, lambda: order.append("main") or 1, lambda: order.append("side") or 2) == (1, 2)
    assert order == ["main", "side"]


def test_encoder_with_a_drawn_sample_equals_its_own_draw():
    torch.manual_seed(0)
    E = models.Encoder((1, 16, 16), 10, 32, (16, 32, 64))
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    own = E(x, y, return_dist=True, generator=torch.Generator().manual_seed(5))
    eps = E.sample_noise(8, torch.Generator().manual_seed(5))
    given = E(x, y, return_dist=True, eps=eps)
    for a, b in zip(own, given):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="eps: expected shape"):
        E(x, y, eps=torch.zeros(8, 31))
