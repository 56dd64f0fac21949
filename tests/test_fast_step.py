"""The fast training step computes what the plain eager fp32 step computes, without host syncs."""

from __future__ import annotations

import pytest
import timm.models.beit as timm_beit
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conmim import ConMIM
from conmim.models.conmim import denoising_contrastive_loss, set_fused_attention
from conmim.train.optim import build_adamw
from conmim.train.step import compile_step, forward_backward, optimizer_step

TINY = dict(arch="vit_tiny", img_size=32, patch_size=8, depth=2, proj_hidden_dim=64, proj_out_dim=32)
B = 4


def make_model(seed: int = 0) -> ConMIM:
    """A tiny ConMIM whose relative position table is random, so a dropped bias would show."""
    torch.manual_seed(seed)
    model = ConMIM(**TINY)
    with torch.no_grad():
        table = model.student.encoder.rel_pos_bias.relative_position_bias_table
        table.normal_(0, 1.0)
    model.teacher.load_state_dict(model.student.state_dict())
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = (TINY["img_size"] // TINY["patch_size"]) ** 2
    weak = torch.randn(B, 3, TINY["img_size"], TINY["img_size"], generator=g)
    strong = torch.randn(B, 3, TINY["img_size"], TINY["img_size"], generator=g)
    return weak, strong, torch.rand(B, n, generator=g) < 0.75


def run_steps(
    model: ConMIM,
    fast: bool,
    steps: int = 2,
    amp_dtype: torch.dtype | None = None,
    student: torch.nn.Module | None = None,
) -> tuple[list[tuple[float, float, float]], dict]:
    """``steps`` optimizer steps with the fast or the plain settings; per step (loss, accuracy,
    grad norm), and the first step's gradients by state-dict key."""
    set_fused_attention(model, fast)
    optimizer = build_adamw(model.student, 1e-3, 0.05, (0.9, 0.98), fused=fast, foreach=fast)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for p in model.student.parameters() if p.requires_grad]
    out, grads = [], {}
    for k in range(steps):
        weak, strong, mask = inputs(k)
        loss, acc = forward_backward(
            model, model.student if student is None else student, weak, strong, mask, amp_dtype, scaler
        )
        if k == 0:
            grads = {f"student.{n}": p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        norm, _ = optimizer_step(model, optimizer, scaler, params, 3.0, 0.99, foreach=fast)
        out.append((loss.item(), acc.item(), norm.item()))
    return out, grads


def assert_same_grads(ga: dict, gb: dict, tol: float) -> None:
    total = torch.cat([g.flatten() for g in ga.values()]).norm()
    assert ga.keys() == gb.keys()
    for key in ga:
        assert (ga[key] - gb[key]).norm() <= tol * ga[key].norm() + 1e-7 * total, key


def assert_same_updates(a: ConMIM, b: ConMIM, start: dict[str, torch.Tensor], grads: dict, tol: float) -> None:
    """Each tensor's change since ``start`` agrees: ||delta_a - delta_b|| <= tol * ||delta_a||.

    Compared as changes, since the weights are ~100x larger than two AdamW steps. Skipped: tensors
    whose gradient is rounding noise, which AdamW turns into full-size steps of random sign in any
    implementation; that is exactly the encoder's final-norm bias (the projector's first BatchNorm
    removes any shift common to all tokens, so its true gradient is 0).
    """
    total = torch.cat([g.flatten() for g in grads.values()]).norm()
    noise = {k for k, g in grads.items() if g.norm() < 1e-6 * total}
    assert noise == {"student.encoder.norm.bias"}
    noise |= {k.replace("student.", "teacher.", 1) for k in noise}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() == start.keys()
    for key, s0 in start.items():
        if not s0.is_floating_point():
            assert torch.equal(sa[key], sb[key]), key
        elif key not in noise:
            da, db = sa[key] - s0, sb[key] - s0
            assert (da - db).norm() <= tol * da.norm() + 1e-12, f"{key}: {(da - db).norm() / da.norm():.2e}"


def test_timm_sdpa_receives_the_relative_position_bias_as_attn_mask(monkeypatch):
    model = make_model()
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(timm_beit.F, "scaled_dot_product_attention", spy)
    weak, _strong, mask = inputs()
    set_fused_attention(model, True)
    fused = model.student(weak, mask)
    heads, tokens = model.student.encoder.blocks[0].attn.num_heads, 1 + mask.shape[1]
    assert seen == [(heads, tokens, tokens)] * TINY["depth"]
    set_fused_attention(model, False)
    explicit = model.student(weak, mask)
    assert len(seen) == TINY["depth"]  # the plain path does not call SDPA
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)


def test_fast_eager_step_equals_plain_step_in_fp32():
    plain, fast = make_model(), make_model()
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    ref, ref_grads = run_steps(plain, fast=False)
    got, got_grads = run_steps(fast, fast=True)  # SDPA, fused AdamW, foreach clipping and EMA
    for (l0, a0, n0), (l1, a1, n1) in zip(ref, got, strict=True):
        assert l1 == pytest.approx(l0, rel=1e-5) and a1 == pytest.approx(a0, abs=1e-6)
        assert n1 == pytest.approx(n0, rel=1e-4)
    assert_same_grads(ref_grads, got_grads, tol=1e-4)
    # Adam divides by sqrt(v), so near-zero gradients amplify summation-order differences (which the
    # thread count changes: 1.02e-3 on one attention projection with OMP_NUM_THREADS=1)
    assert_same_updates(plain, fast, start, ref_grads, tol=3e-3)


def test_bf16_autocast_step_is_close_and_the_loss_stays_fp32():
    ref = run_steps(make_model(), fast=False, steps=1)[0][0]
    got = run_steps(make_model(), fast=True, steps=1, amp_dtype=torch.bfloat16)[0][0]
    assert got[0] == pytest.approx(ref[0], rel=2e-2)  # bf16 features, fp32 logits and cross-entropy
    # Under autocast the loss still computes in fp32: the same as computing it outside autocast.
    g = torch.Generator().manual_seed(3)
    s, t = (torch.randn(B, 16, 32, generator=g).bfloat16() for _ in "st")
    mask = torch.rand(B, 16, generator=g) < 0.75
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = denoising_contrastive_loss(s, t, mask, 0.1)
    outside = denoising_contrastive_loss(s.float(), t.float(), mask, 0.1)
    assert inside[0].dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_compiled_step_equals_plain_step_aot_eager():
    """Dynamo + AOTAutograd graphs of teacher, student and loss (the inductor variant is slow-marked)."""
    plain, fast = make_model(), make_model()
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    ref, ref_grads = run_steps(plain, fast=False)
    student = compile_step(fast, fast.student, backend="aot_eager")
    got, got_grads = run_steps(fast, fast=True, student=student)
    for (l0, _, _), (l1, _, _) in zip(ref, got, strict=True):
        assert l1 == pytest.approx(l0, rel=1e-5)
    assert_same_grads(ref_grads, got_grads, tol=1e-4)
    assert_same_updates(plain, fast, start, ref_grads, tol=3e-3)  # see the eager test
    assert not any(k.startswith("_orig_mod") or "._orig_mod" in k for k in fast.state_dict())


@pytest.mark.slow
def test_compiled_step_equals_plain_step_inductor():
    """The real ``train.compile`` path (inductor's C++ kernels on CPU); about a minute on 2 cores."""
    plain, fast = make_model(), make_model()
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    ref, ref_grads = run_steps(plain, fast=False)
    got, got_grads = run_steps(fast, fast=True, student=compile_step(fast, fast.student))
    for (l0, _, _), (l1, _, _) in zip(ref, got, strict=True):
        assert l1 == pytest.approx(l0, rel=1e-4)
    assert_same_grads(ref_grads, got_grads, tol=1e-3)
    assert_same_updates(plain, fast, start, ref_grads, tol=1e-2)


class SyncOps(TorchDispatchMode):
    """Records the ops that would make the host wait for the device (values read back, or shapes
    that depend on values: boolean indexing, nonzero, masked_select)."""

    SYNCING = {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::is_nonzero",
        "aten::equal",
        "aten::unique",
        "aten::_unique2",
    }

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name == "aten::index" else []
        bool_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if name in self.SYNCING or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_training_step_never_reads_a_value_back_to_the_host():
    model = make_model()
    optimizer = build_adamw(model.student, 1e-3, 0.05, (0.9, 0.98), fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for p in model.student.parameters() if p.requires_grad]
    weak, strong, mask = inputs()
    with SyncOps() as probe:
        for _ in range(2):
            loss, acc = forward_backward(model, model.student, weak, strong, mask, torch.bfloat16, scaler)
            norm, _ = optimizer_step(model, optimizer, scaler, params, 3.0, 0.99)
            stats = torch.stack([loss, acc, norm.float(), mask.float().mean()])  # what the engine accumulates
    assert probe.found == []
    assert torch.isfinite(stats).all()
