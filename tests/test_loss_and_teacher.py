import math

import pytest
import timm
import torch
import torch.nn.functional as F
from tiny import TINY_MODEL_ARGS

from conmim import ConMIM, denoising_contrastive_loss, timm_spec
from conmim.train.schedules import teacher_momentum, warmup_cosine


def tiny_model(**kw) -> ConMIM:
    return ConMIM(**TINY_MODEL_ARGS, **kw)


def official_loss(student, teacher, mask, temperature):
    """docs/method.md §8 written the official way: select the masked rows, target = own position, mean CE."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    logits = torch.einsum("bnd,bmd->bnm", s, t) / temperature
    rows = logits[mask]
    target = torch.arange(logits.shape[1]).unsqueeze(0).expand_as(mask)[mask]
    return F.cross_entropy(rows, target)


def test_constant_features_give_exactly_log_n():
    n = 49
    feats = torch.ones(3, n, 8)
    mask = torch.rand(3, n) < 0.5
    loss, _ = denoising_contrastive_loss(feats, feats, mask, 0.1)
    assert loss.item() == pytest.approx(math.log(n), abs=1e-5)


def test_loss_equals_official_definition_for_same_inputs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 36, 16, generator=g), torch.randn(4, 36, 16, generator=g)
    mask = torch.rand(4, 36, generator=g) < 0.7
    ours, acc = denoising_contrastive_loss(s, t, mask, 0.1)
    torch.testing.assert_close(ours, official_loss(s, t, mask, 0.1))
    logits = torch.einsum("bnd,bmd->bnm", F.normalize(s, dim=-1), F.normalize(t, dim=-1))
    expected_acc = (logits.argmax(-1) == torch.arange(36))[mask].float().mean()
    torch.testing.assert_close(acc, expected_acc)


def test_model_loss_equals_official_on_model_outputs():
    torch.manual_seed(0)
    model = tiny_model()
    weak, strong = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    mask = torch.rand(4, 16) < 0.75
    loss = model(weak, strong, mask)
    ref = official_loss(model.student(weak, mask), model.teacher(strong), mask, 0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_loss_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.rand(2, 16) < 0.75
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, acc = model.forward_with_stats(x, x, mask)
    assert loss.dtype == torch.float32 and acc.dtype == torch.float32


def test_loss_near_log_n_at_initialisation(natural_images):
    """ViT-S/16 measured 6.26 at 224 on these images (ln 196 = 5.28): the projector's final
    BatchNorm spreads the cosine logits, so the start sits a little above ln N. A 4-block ViT-Ti
    keeps the test fast."""
    from conmim.data.masking import MaskGenerator
    from conmim.data.sources import image_folder
    from conmim.data.views import PairedViews

    torch.manual_seed(0)
    model = ConMIM("vit_tiny", 224, 16, depth=4)
    source, views, g = image_folder(natural_images), PairedViews(224), torch.Generator().manual_seed(0)
    pairs = [views(source[i][0], g) for i in range(6)]
    weak, strong = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    mask = torch.stack([MaskGenerator((14, 14))(g) for _ in range(6)])
    with torch.no_grad():
        loss = model(weak, strong, mask).item()
    assert math.log(196) - 0.5 < loss < 1.3 * math.log(196)


def test_gradients_reach_only_the_student():
    model = tiny_model()
    x = torch.randn(4, 3, 16, 16)
    model(x, x, torch.rand(4, 16) < 0.75).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for n, p in model.student.named_parameters())


def test_teacher_starts_as_exact_copy_and_moves_only_by_ema():
    model = tiny_model(drop_path=0.1)
    for (name, t), s in zip(model.teacher.state_dict().items(), model.student.state_dict().values(), strict=True):
        assert torch.equal(t, s), name
    opt = torch.optim.SGD(model.student.parameters(), lr=0.1)
    x = torch.randn(4, 3, 16, 16)
    before = [p.clone() for p in model.teacher.parameters()]
    model(x, x, torch.rand(4, 16) < 0.75).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters(), strict=True))
    model.update_teacher(1.0)  # momentum 1: unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters(), strict=True))
    model.update_teacher(0.0)  # momentum 0: copy of the student
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.student.parameters(), strict=True))
    model2 = tiny_model()
    t0 = [p.clone() for p in model2.teacher.parameters()]
    with torch.no_grad():
        for p in model2.student.parameters():
            p.add_(1.0)
    model2.update_teacher(0.9)
    for a, t, s in zip(t0, model2.teacher.parameters(), model2.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * s)


def test_teacher_has_no_drop_path_and_optional_eval_bn():
    model = tiny_model(drop_path=0.2, teacher_bn_eval=True)
    assert all(blk.drop_path1.__class__.__name__ == "Identity" for blk in model.teacher.encoder.blocks)
    model.train()
    assert model.student.training and not model.teacher.training


def test_student_encoder_loads_strictly_into_timm():
    model = tiny_model()
    encoder = timm.create_model(model.spec["model_name"], **model.spec["kwargs"])
    encoder.load_state_dict(model.student.encoder.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    encoder.eval(), model.student.encoder.eval()
    torch.testing.assert_close(encoder.forward_features(x), model.student.features(x))


def test_official_encoder_layout():
    model = ConMIM("vit_tiny", 224, 16, depth=2, proj_hidden_dim=64)
    enc = model.student.encoder
    assert enc.pos_embed is None and enc.rel_pos_bias is not None
    assert enc.rel_pos_bias.relative_position_bias_table.shape == (732, 3)
    assert torch.count_nonzero(enc.rel_pos_bias.relative_position_bias_table) == 0
    idx = enc.rel_pos_bias.relative_position_index
    # patch (h, w) = (0, 0) vs (1, 2): (0 - 1 + 13) * 27 + (0 - 2 + 13)
    assert idx[1, 1 + 1 * 14 + 2] == 12 * 27 + 11
    assert idx[0, 5] == 729 and idx[5, 0] == 730 and idx[0, 0] == 731
    assert enc.blocks[0].gamma_1.detach().eq(0.1).all() and enc.blocks[0].attn.q_bias is not None
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    # +-1 std truncation quirk: every value within 0.02, effective std ~0.0108
    w = enc.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.02 + 1e-7 and 0.009 < w.std() < 0.0125


def test_vit_base_backbone_size_matches_spec():
    spec = timm_spec("vit_base", 224, 16)
    with torch.device("meta"):
        enc = timm.create_model(spec["model_name"], **spec["kwargs"])
    assert abs(sum(p.numel() for p in enc.parameters()) / 1e6 - 85.7) < 0.3  # docs/method.md §2.1


def test_schedules_hit_their_ends():
    assert warmup_cosine(0, 100, 1.0, 0.1, warmup=10) == 0.0
    assert warmup_cosine(10, 100, 1.0, 0.1, warmup=10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    assert teacher_momentum(0, 50, 0.996, 1.0) == pytest.approx(0.996)
    assert teacher_momentum(49, 50, 0.996, 1.0) == pytest.approx(1.0)
    assert teacher_momentum(2000, 4001, 0.996, 1.0) == pytest.approx(0.998)
