from conmim import ConMIM
from conmim.optim import param_groups


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
