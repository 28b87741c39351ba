"""Module 1's encoder steps beside the student's (data_free.encoder_worker) give the serial order's numbers
bit for bit: weights, BN buffers, optimiser state, every epoch's metrics and the random stream after."""
import threading

import pytest
import torch

from augkd import models
from augkd.config import build_config
from augkd.method import data_free
from augkd.method.rundir import finish, prepare

SMALL = {
    "threads": 1, "plots": False, "device": "cpu", "df.epochs": 2, "df.iters_per_epoch": 2, "df.batch_size": 16,
    "df.student_steps": 3, "df.val_batches": 1, "data.k_shot": 2,
}


def _run(tmp_path, name: str, serial: bool, monkeypatch, seen: set):
    monkeypatch.setenv(data_free.SERIAL_ENV, "1" if serial else "0")
    monkeypatch.setattr(data_free.os, "cpu_count", lambda: 4)  # a core to spare, whatever runs the test
    cfg = build_config(SMALL)
    ctx = prepare(cfg, str(tmp_path / name), quiet=True)
    try:
        shape, k, latent = tuple(ctx.data.image_shape), ctx.data.num_classes, cfg.df.latent_size
        torch.manual_seed(0)
        T = ctx.place(models.build_classifier(cfg.teacher.arch, k, shape[0], shape[1]))
        G = ctx.place(models.Generator(latent, shape, cfg.df.generator_hidden))
        E = ctx.place(models.Encoder(shape, k, latent, cfg.df.encoder_hidden))
        S = ctx.place(models.build_classifier(cfg.student.arch, k, shape[0], shape[1]))
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


def test_encoder_worker_keeps_every_number_of_the_serial_order(tmp_path, monkeypatch):
    serial_threads, worker_threads = set(), set()
    a = _run(tmp_path, "serial", True, monkeypatch, serial_threads)
    b = _run(tmp_path, "worker", False, monkeypatch, worker_threads)
    assert a[4] is None and b[4] is not None
    assert any(n.startswith("augkd-df-encoder") for n in worker_threads)  # the training steps used it
    assert not any(n.startswith("augkd-df-encoder") for n in serial_threads)
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
        monkeypatch.setattr(data_free.os, "cpu_count", lambda: 1)
        monkeypatch.delenv(data_free.SERIAL_ENV, raising=False)
        assert data_free.encoder_worker(ctx) is None  # no core to spare
        monkeypatch.setattr(data_free.os, "cpu_count", lambda: 4)
        worker = data_free.encoder_worker(ctx)
        assert worker is not None
        assert worker.submit(torch.get_num_threads).result() == torch.get_num_threads()
        worker.shutdown()
        monkeypatch.setenv(data_free.SERIAL_ENV, "1")
        assert data_free.encoder_worker(ctx) is None
    finally:
        finish(ctx)


def test_an_error_in_the_student_step_waits_for_the_encoder_step(tmp_path, monkeypatch):
    cfg = build_config(SMALL)
    ctx = prepare(cfg, str(tmp_path / "run"), quiet=True)
    monkeypatch.setattr(data_free.os, "cpu_count", lambda: 4)
    monkeypatch.delenv(data_free.SERIAL_ENV, raising=False)
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
