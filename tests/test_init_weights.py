"""``model.init``: continued pre-training from a real conmim run, its exports, a timm state dict and an
official-layout checkpoint, at the same or another image and patch size; weights written and read back."""

from __future__ import annotations

import argparse
import logging

import pytest
import timm
import torch
from conftest import TINY
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from conmim.cli import main
from conmim.config import ConfigError, load_config
from conmim.export.encoders import load_encoder, load_run_checkpoint
from conmim.models.conmim import ConMIM, timm_spec
from conmim.models.resize import resize_patch_kernel, resize_rel_pos_table
from conmim.train.engine import pretrain
from conmim.train.init_weights import init_from

pytestmark = pytest.mark.usefixtures("one_thread")
TABLE = "encoder.rel_pos_bias.relative_position_bias_table"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real tiny run: 16-px images, 4-px patches (a 4 x 4 grid), two optimizer steps."""
    out = tmp_path_factory.mktemp("init") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = ["data.source=synthetic", "data.synthetic_size=32", "train.max_steps=2", f"output_dir={out}"]
        pretrain(load_config(None, TINY + overrides))
    finally:
        torch.set_num_threads(before)
    return out


def tiny(img_size: int = 16, patch_size: int = 4, **kwargs) -> ConMIM:
    torch.manual_seed(1)
    return ConMIM("vit_tiny", img_size, patch_size, depth=2, proj_hidden_dim=64, proj_out_dim=32, **kwargs)


def run_branch(run_dir, name: str = "teacher") -> dict[str, torch.Tensor]:
    model = load_run_checkpoint(run_dir)[0]["model"]
    return {k.removeprefix(f"{name}."): v for k, v in model.items() if k.startswith(f"{name}.")}


def teacher_branch(run_dir) -> dict[str, torch.Tensor]:
    return run_branch(run_dir, "teacher")


def assert_teacher_copies_student(model: ConMIM) -> None:
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)


def test_same_size_continues_each_branch_of_the_run_exactly(run_dir):
    """From a conmim run the student continues from its student and the teacher from its teacher
    (starting both from the teacher halved the default run's retrieval accuracy: docs/results.md)."""
    model = tiny()
    assert init_from(model, run_dir) == []  # the checkpoint has mask token and projector: nothing fresh
    for name in ("student", "teacher"):
        source, state = run_branch(run_dir, name), getattr(model, name).state_dict()
        assert state.keys() == source.keys() and all(torch.equal(state[k], source[k]) for k in state), name
    assert not torch.equal(model.student.state_dict()[TABLE], model.teacher.state_dict()[TABLE])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model.teacher.encoder.eval().forward_features(x), load_encoder(run_dir).eval().forward_features(x)
        )


@pytest.mark.parametrize("img_size, patch_size", [(32, 4), (16, 2)], ids=["larger-image", "smaller-patch"])
def test_another_grid_resizes_positions_and_patch_kernel(run_dir, img_size, patch_size):
    model = tiny(img_size, patch_size)
    init_from(model, run_dir)
    for name in ("student", "teacher"):
        source, state = run_branch(run_dir, name), getattr(model, name).state_dict()
        assert state[TABLE].shape == ((2 * 8 - 1) ** 2 + 3, 3)  # an 8 x 8 grid either way
        torch.testing.assert_close(state[TABLE], resize_rel_pos_table(source[TABLE], (4, 4), (8, 8)))
        kernel = "encoder.patch_embed.proj.weight"
        torch.testing.assert_close(state[kernel], resize_patch_kernel(source[kernel], (patch_size, patch_size)))
        for key in ("encoder.blocks.1.mlp.fc2.weight", "mask_token", "projector.0.weight", "encoder.norm.bias"):
            assert torch.equal(state[key], source[key]), (name, key)


@pytest.mark.parametrize("fmt", ["safetensors", "hub"])
def test_encoder_only_exports_leave_mask_token_and_projector_fresh(run_dir, tmp_path, fmt):
    out = tmp_path / ("enc.safetensors" if fmt == "safetensors" else "hub")
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    model = tiny(32, 4)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    fresh = init_from(model, out)
    assert (
        "mask_token" in fresh
        and "projector.0.weight" in fresh
        and len(fresh) == 1 + len(model.student.projector.state_dict())
    )
    state, source = model.student.state_dict(), teacher_branch(run_dir)
    assert torch.equal(state["mask_token"], before["mask_token"])
    assert torch.equal(state["projector.0.weight"], before["projector.0.weight"])
    assert torch.equal(state["encoder.blocks.0.attn.qkv.weight"], source["encoder.blocks.0.attn.qkv.weight"])
    assert_teacher_copies_student(model)


def test_timm_vit_state_dict_with_absolute_positions_at_another_size(tmp_path):
    spec = timm_spec("vit_tiny", 16, 4, depth=2, encoder="vit")
    torch.manual_seed(3)
    vit = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "timm_vit.pth")  # timm's train.py container
    model = tiny(32, 4, encoder="vit")
    assert sorted(init_from(model, tmp_path / "timm_vit.pth"))[0] == "mask_token"
    pos = model.student.state_dict()["encoder.pos_embed"]
    assert pos.shape == (1, 1 + 64, 192)
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(pos, expected)
    assert torch.equal(pos[:, 0], vit.pos_embed.detach()[:, 0])  # the [CLS] entry is kept


def test_official_layout_checkpoint_keeps_its_mask_token_and_drops_its_projector(run_dir, tmp_path):
    """The authors' files: BEiT names at the top level under ``model``, argparse args, a mask token,
    their own projector and lm_head names, and index buffers."""
    source = teacher_branch(run_dir)
    official = {k.removeprefix("encoder."): v for k, v in source.items() if k.startswith("encoder.")}
    official["mask_token"] = torch.full((1, 1, 192), 0.5)
    official["projectors.0.weight"] = torch.randn(64, 192)
    official["lm_head.weight"] = torch.randn(8192, 192)
    official["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    torch.save({"model": official, "args": argparse.Namespace(model="beit_base_patch16_224")}, tmp_path / "c.pth")
    model = tiny()
    fresh = init_from(model, tmp_path / "c.pth")
    assert "mask_token" not in fresh and all(k.startswith("projector.") for k in fresh)
    assert torch.equal(model.student.mask_token, official["mask_token"])
    assert torch.equal(model.student.state_dict()[TABLE], source[TABLE])


def test_weights_that_do_not_fit_are_named(run_dir, tmp_path):
    small = ConMIM("vit_small", 16, 4, depth=2, proj_hidden_dim=64, proj_out_dim=32)
    with pytest.raises(ConfigError) as err:
        init_from(small, run_dir)
    text = str(err.value)
    assert text.startswith(f"model.init={str(run_dir)!r}: these weights do not fit the configured model")
    assert "of another shape: encoder.cls_token (1, 1, 192) vs (1, 1, 384)" in text and "more)" in text
    deeper = ConMIM("vit_tiny", 16, 4, depth=3, proj_hidden_dim=64, proj_out_dim=32)
    with pytest.raises(ConfigError, match=r"missing: encoder\.blocks\.2\.gamma_1, "):
        init_from(deeper, run_dir)
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"unexpected: encoder\.weight"):
        init_from(tiny(), tmp_path / "other.safetensors")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read weights"):
        init_from(tiny(), tmp_path / "garbage.pth")


def test_cli_continues_pretraining_at_another_size_once(run_dir, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    out = tmp_path / "continued"
    args = TINY + ["data.source=synthetic", "data.synthetic_size=32", "model.img_size=32", f"output_dir={out}"]
    assert main(["pretrain", *args, "train.max_steps=1", f"model.init={run_dir}"]) == 0
    assert f"student and teacher initialised from {run_dir}" in caplog.text
    caplog.clear()
    assert main(["pretrain", *args, "train.max_steps=2", f"model.init={run_dir}"]) == 0  # resumes: no re-init
    assert "resumed from" in caplog.text and "initialised from" not in caplog.text
    assert main(["pretrain", *args, f"model.init={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "model.init=" in capsys.readouterr().err
    assert main(["pretrain", *args, "model.objective=pixel", f"model.init={run_dir}"]) == 2
    assert "only with model.objective=conmim" in capsys.readouterr().err
