"""Numerical faults: NaN injected into a real run's inputs.

The test hook ``conmim.train.engine.INJECT_NAN_STEPS`` multiplies the student's and the teacher's inputs
by NaN at the listed steps, so the forward passes (BatchNorm statistics included), the loss and every
gradient are NaN.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from reliability_utils import TINY, assert_same_state, final_state, pretrain_in_process, records
from torch.utils._python_dispatch import TorchDispatchMode

from conmim.cli import main as cli_main
from conmim.models.conmim import ConMIM
from conmim.runtime import checkpoint as ckpt
from conmim.train import engine
from conmim.train.guard import StepGuard
from conmim.train.optim import build_adamw


def inject_nan(monkeypatch, *steps: int) -> None:
    monkeypatch.setattr(engine, "INJECT_NAN_STEPS", frozenset(steps))


def test_a_nan_step_is_skipped_exactly(tmp_path, monkeypatch):
    """Step 3 is NaN: after it, student, teacher, BatchNorm statistics and AdamW state are bitwise
    those after step 2 of a clean run, and the skip is counted in metrics.jsonl."""
    pretrain_in_process(tmp_path / "clean", "train.max_steps=2")
    inject_nan(monkeypatch, 3)
    pretrain_in_process(tmp_path / "nan", "train.max_steps=3")
    assert_same_state(final_state(tmp_path / "nan"), final_state(tmp_path / "clean"), same_step=False)
    last = records(tmp_path / "nan")[-1]
    assert last["step"] == 3 and last["skipped_steps"] == 1 and last["loss"] is None
    assert records(tmp_path / "nan")[:2] == records(tmp_path / "clean")


def test_fp16_nan_step_is_skipped_and_the_loss_scale_backs_off(tmp_path, monkeypatch):
    """With fp16 the GradScaler also sees the NaN step: the guard skips it exactly as in fp32 (weights,
    teacher, BatchNorm and AdamW state those of the clean run), and the scaler halves its scale.
    The first 3 steps overflow by design while the scale calibrates (65,536 -> 8,192) and count as skipped."""
    pretrain_in_process(tmp_path / "clean", "train.max_steps=5", "precision=fp16")
    inject_nan(monkeypatch, 6)
    pretrain_in_process(tmp_path / "nan", "train.max_steps=6", "precision=fp16")
    clean, nan = final_state(tmp_path / "clean"), final_state(tmp_path / "nan")
    assert [r["skipped_steps"] for r in records(tmp_path / "clean")] == [1, 2, 3, 3, 3]  # 4 and 5 trained
    assert_same_state(nan, clean, same_step=False)
    assert nan["scaler"]["scale"] == clean["scaler"]["scale"] * nan["scaler"]["backoff_factor"]
    last = records(tmp_path / "nan")[-1]
    assert last["step"] == 6 and last["skipped_steps"] == 4 and last["loss"] is None


def test_consecutive_nan_steps_restore_the_last_good_checkpoint_with_a_lower_lr(tmp_path, caplog, monkeypatch):
    clean, bad = tmp_path / "clean", tmp_path / "bad"
    pretrain_in_process(clean, "train.max_steps=8")
    inject_nan(monkeypatch, 4, 5, 6)
    with caplog.at_level(logging.WARNING, logger="conmim.train.engine"):
        pretrain_in_process(bad, "train.max_steps=8", "train.max_bad_steps=3", "train.nan_lr_factor=0.25")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NaN/Inf in 3 consecutive steps (4-6" in m and "step_00000003.pt" in m for m in warned), warned
    got, ref = records(bad), records(clean)
    assert [r["step"] for r in got] == list(range(1, 9))  # the abandoned steps 4-6 were rewound
    assert got[:3] == ref[:3]
    for g, r in zip(got[3:], ref[3:], strict=True):
        assert g["nan_restores"] == 1 and g["skipped_steps"] == 3
        assert math.isclose(g["lr"], 0.25 * r["lr"], rel_tol=1e-12)
        assert g["loss"] is not None and math.isfinite(g["loss"])
    state = final_state(bad)
    assert state["guard"]["lr_scale"] == 0.25 and state["guard"]["restores"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "overrides, nan_steps, expect",
    [
        (("train.nan_policy=stop",), (3, 4, 5, 6), "train.nan_policy=stop"),
        (("train.nan_max_restores=0",), (3, 4, 5, 6), "train.nan_max_restores=0"),
        ((), (1, 2, 3, 4), "no checkpoint predates them"),
    ],
)
def test_persistent_nan_stops_with_a_clear_message(tmp_path, capsys, monkeypatch, overrides, nan_steps, expect):
    run_dir = tmp_path / "run"
    inject_nan(monkeypatch, *nan_steps)
    args = ["pretrain", *TINY, f"output_dir={run_dir}", "train.max_steps=10", "train.max_bad_steps=2", *overrides]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(args) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "conmim: error: stopping: loss or gradients were NaN/Inf in 2 consecutive steps" in err, err
    assert expect in err, err
    found = ckpt.load_latest(run_dir / "checkpoints")
    if found is not None:  # every checkpoint on disk holds finite weights
        assert all(torch.isfinite(v).all() for v in found[0]["model"].values() if v.is_floating_point())


def test_inf_gradient_leaves_weights_moments_teacher_and_batchnorm_untouched():
    """The guard alone, on a real model and fused AdamW, with +Inf in one gradient; it reads nothing
    back to the host."""
    torch.manual_seed(0)
    model = ConMIM("vit_tiny", img_size=16, patch_size=4, depth=1, proj_hidden_dim=32, proj_out_dim=16)
    optimizer = build_adamw(model.student, 1e-3, 0.05, (0.9, 0.98), fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = StepGuard(model, optimizer, scaler, max_bad_steps=5, log_every=10)
    params = [p for p in model.student.parameters() if p.requires_grad]
    weak, strong = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True

    def step(poison: bool) -> torch.Tensor:
        with reads:
            guard.begin()
        loss = model(weak, strong, mask)
        loss.backward()
        if poison:
            params[0].grad[0] = math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 3.0)
        with reads:
            ok = guard.check(grad_norm)
        optimizer.step()
        with reads:
            guard.finish(ok)
            model.update_teacher(0.9, apply=ok)
        optimizer.zero_grad()
        return ok

    reads = ScalarReads()

    assert step(False)  # one good step so that AdamW has moments
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    assert not step(True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in optimizer.state[params[0]].items():
        assert torch.equal(value, moments[key]), key
    assert int(guard.skipped) == 1 and int(guard.bad_run) == 1
    assert step(False) and int(guard.bad_run) == 0
    after = model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("student."))
    assert reads.count == 0, "the guard read a device value back to the host during a step"
    with reads:
        int(guard.bad_run)  # what a host read looks like to the counter
    assert reads.count == 1


class ScalarReads(TorchDispatchMode):
    """Counts ``aten::_local_scalar_dense``: every tensor -> Python number (``.item()``, ``bool()``,
    ``int()``), i.e. what would be a device-to-host synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _nan_loss_at(inner, steps: set[int] | None):
    """A criterion (or ``loss_of``) that is NaN at the listed 1-based calls (every call from the first
    listed one on when ``steps`` holds a single negative number)."""
    calls = {"n": 0}

    def loss(*args):
        calls["n"] += 1
        value = inner(*args)
        bad = calls["n"] in steps if min(steps) > 0 else calls["n"] >= -min(steps)
        return value * float("nan") if bad else value

    return loss


@pytest.mark.parametrize(("nan_calls", "stops"), [({3}, False), ({-2}, True)])
def test_finetune_skips_a_nan_step_and_stops_when_they_persist(tmp_path, monkeypatch, nan_calls, stops):
    """One NaN step is skipped on the device (weights and AdamW moments stay finite, the skip is in
    metrics.jsonl); NaN from step 2 on stops after ``finetune.max_bad_steps`` with the field to change."""
    import json

    import timm

    import conmim.eval.finetune as ft
    from conmim.config import load_config
    from conmim.eval.common import eval_sources
    from conmim.models.conmim import encoder_spec
    from conmim.train.guard import NonFiniteError

    real = ft.mixup_and_criterion
    monkeypatch.setattr(
        ft, "mixup_and_criterion", lambda f, n: (lambda m, c: (m, _nan_loss_at(c, nan_calls)))(*real(f, n))
    )
    cfg = load_config(
        None,
        [*TINY, "data.source=fashion_mnist", "data.path=/usr/share/datasets/fashion-mnist", "data.train_limit=48"]
        + ["data.test_limit=8", "finetune.epochs=1", "finetune.batch_size=8", "finetune.log_every=1"]
        + ["finetune.max_bad_steps=3", f"output_dir={tmp_path}"],
        command="finetune",
        default_preset="fashion_mnist",
    )
    spec = encoder_spec(cfg.model)
    encoder = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    train, test = eval_sources(cfg, 16)
    if stops:
        with pytest.raises(NonFiniteError, match="3 non-finite steps in a row up to step 4.*finetune.base_lr"):
            ft.finetune(encoder, train, test, cfg)
        return
    ft.finetune(encoder, train, test, cfg)
    lines = [json.loads(line) for line in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "train_loss" in r]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 1, 1, 1] and steps[2]["train_loss"] is None
    state = torch.load(tmp_path / "finetune" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in moments) and state["guard"]["skipped_steps"] == 1


@pytest.mark.parametrize(("nan_calls", "stops"), [({2}, False), ({-2}, True)])
def test_the_dense_loop_skips_a_nan_iteration_and_stops_when_they_persist(tmp_path, nan_calls, stops):
    """The loop ``conmim segment`` and ``conmim detect`` share, on a linear model: a skipped NaN
    iteration leaves the weights as they were after the iteration before it."""
    import json

    from conmim.dense.loop import Schedule, train_iterations
    from conmim.runtime.distributed import DistInfo
    from conmim.train.guard import NonFiniteError

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr_scale": 1.0}], lr=1e-2, fused=True)
    data = [torch.randn(8, 4) for _ in range(6)]
    seen = []

    def loss_of(x):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return model(x).pow(2).mean()

    schedule = Schedule(6, 1e-2, 0, 1.0, 1.0, 0.0, 1, 100, max_bad_steps=3)
    args = (model, optimizer, lambda start: data[start:], _nan_loss_at(loss_of, nan_calls), lambda: {"m": 0.0})
    rest = (("m",), schedule, tmp_path, "", torch.device("cpu"), None, "segment", DistInfo())
    if stops:
        with pytest.raises(NonFiniteError, match="segment.lr"):
            train_iterations(*args, *rest)
        return
    train_iterations(*args, *rest)
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # iteration 2 changed nothing
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in lines if "train_loss" in r] == [0, 1, 1, 1, 1, 1]
