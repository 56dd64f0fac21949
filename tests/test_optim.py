from conmim import ConMIM
from conmim.train.optim import param_groups


def names_in(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.student.named_parameters() if id(p) in ids}


def test_weight_decay_groups_follow_the_official_rules():
    model = ConMIM("vit_tiny", 16, 4, depth=1, proj_hidden_dim=32, proj_out_dim=16)
    decay, no_decay = param_groups(model.student, 0.05)
    d, nd = names_in(model, decay), names_in(model, no_decay)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {
        "encoder.blocks.0.attn.qkv.weight",
        "encoder.patch_embed.proj.weight",
        "projector.0.weight",
        "mask_token",
        "encoder.rel_pos_bias.relative_position_bias_table",
    } <= d
    assert {
        "encoder.cls_token",
        "encoder.blocks.0.attn.q_bias",
        "encoder.blocks.0.gamma_1",
        "encoder.norm.weight",
        "encoder.patch_embed.proj.bias",
        "projector.1.weight",
    } <= nd
    assert d | nd == {n for n, _ in model.student.named_parameters()} and not d & nd
    decay2, no_decay2 = param_groups(model.student, 0.05, decay_mask_token=False, decay_rel_pos=False)
    assert {"mask_token", "encoder.rel_pos_bias.relative_position_bias_table"} <= names_in(model, no_decay2)


def test_encoder_no_weight_decay_list_is_honoured():
    """The encoder's own ``no_weight_decay()`` (timm) decides for tokens and absolute positions."""
    model = ConMIM("vit_tiny", 16, 4, depth=1, proj_hidden_dim=32, proj_out_dim=16, pos_embed="sincos")
    decay, no_decay = param_groups(model.student, 0.05)
    assert "encoder.pos_embed" in names_in(model, no_decay)
    assert "encoder.pos_embed" in {f"encoder.{n}" for n in model.student.encoder.no_weight_decay()}


def test_gradient_checkpointing_keeps_gradients_and_saves_fewer_activations():
    import torch

    def step(checkpointing: bool):
        torch.manual_seed(0)
        model = ConMIM("vit_tiny", 32, 4, depth=3, proj_hidden_dim=32, proj_out_dim=16)
        model.student.set_grad_checkpointing(checkpointing)
        x, mask = torch.randn(4, 3, 32, 32), torch.rand(4, 64) < 0.75
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(x, x, mask)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        return loss.item(), grads, sum(saved)

    loss0, grads0, kept0 = step(False)
    loss1, grads1, kept1 = step(True)
    assert loss1 == loss0 and grads1.keys() == grads0.keys()
    assert all(torch.allclose(grads1[n], grads0[n], atol=1e-6) for n in grads0)
    assert kept1 < 0.5 * kept0, (kept1, kept0)  # only each block's input is kept for the backward pass
