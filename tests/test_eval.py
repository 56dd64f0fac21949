"""Evaluation and fine-tuning on real Fashion-MNIST images with tiny encoders: k-NN, linear probe,
fine-tuning, layer decay, relative-position transfer, the online monitor and the CLI commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from tiny import TINY, TINY_MODEL_ARGS

from conmim import ConMIM
from conmim.cli import main
from conmim.config import Config, ConfigError
from conmim.data.sources import ArraySource, fashion_mnist
from conmim.eval.common import EvalTransform, LabeledDataset
from conmim.eval.finetune import evaluate, finetune, layer_decay_groups
from conmim.eval.knn import encode, extract_features, knn_accuracy, knn_predict
from conmim.eval.linprobe import linear_probe
from conmim.eval.transfer import build_classifier, resize_rel_pos_table
from conmim.export.encoders import load_encoder, write_encoder
from conmim.models.conmim import timm_spec

FM = "/usr/share/datasets/fashion-mnist"


def _subset(source: ArraySource, n: int, offset: int = 0) -> ArraySource:
    return ArraySource(source.images[offset : offset + n], source.labels[offset : offset + n], source.classes)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin contention (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fm() -> tuple[ArraySource, ArraySource]:
    return _subset(fashion_mnist(FM, "train"), 600), _subset(fashion_mnist(FM, "test"), 200)


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return ConMIM(**TINY_MODEL_ARGS).teacher.encoder.eval()


@pytest.fixture(scope="module")
def exported(encoder, tmp_path_factory):
    spec = timm_spec("vit_tiny", 16, 4, depth=2)
    return write_encoder(dict(encoder.state_dict()), spec, tmp_path_factory.mktemp("export") / "enc.safetensors")[0]


def _cfg(**sections) -> Config:
    cfg = Config()
    cfg.data.num_workers, cfg.precision, cfg.device = 0, "fp32", "cpu"
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def test_encode_blocks_and_pooling(encoder):
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = encoder.forward_features(x)
        assert torch.allclose(encode(encoder, x, "cls"), tokens[:, 0], atol=1e-6)
        assert torch.allclose(encode(encoder, x, "mean"), tokens[:, 1:].mean(1), atol=1e-6)
        assert not torch.allclose(encode(encoder, x, "cls", block=0), tokens[:, 0], atol=1e-3)
    with pytest.raises(ConfigError, match="block=2"):
        encode(encoder, x, block=2)


def test_knn_equals_brute_force_and_beats_chance(encoder, fm):
    train, test = fm
    transform = EvalTransform(16, Config().data.mean, Config().data.std)
    bank_x, bank_y = extract_features(encoder, LabeledDataset(train, transform), 128, "mean")
    query_x, query_y = extract_features(encoder, LabeledDataset(test, transform), 128, "mean")
    k, t = 20, 0.07
    scores = knn_predict(bank_x, bank_y, query_x, k, t, num_classes=10, chunk=64)
    bank_n = bank_x / bank_x.norm(dim=1, keepdim=True)
    for i, q in enumerate(query_x):  # one query at a time: sort all similarities, vote with the top k
        sims = bank_n @ (q / q.norm())
        order = sorted(range(len(sims)), key=lambda j: -float(sims[j]))[:k]
        expected = torch.zeros(10)
        for j in order:
            expected[bank_y[j]] += math.exp(float(sims[j]) / t)
        assert torch.allclose(scores[i], expected, rtol=1e-4, atol=1e-6)
    assert knn_accuracy(bank_x, bank_y, query_x, query_y, k, t) > 40.0  # chance: 10 %


def test_linear_probe_beats_chance(exported, fm):
    cfg = _cfg(linprobe__epochs=30, linprobe__warmup_epochs=3, linprobe__pool="mean", linprobe__batch_size=64)
    result = linear_probe(exported, *fm, cfg)
    assert result["top1"] > 40.0 and result["feature_dim"] == 192 and result["num_classes"] == 10
    cfg.linprobe.cache_features, cfg.linprobe.epochs, cfg.linprobe.optimizer = False, 1, "lars"
    assert linear_probe(exported, *fm, cfg)["top1"] > 10.0  # augmented path without a cache runs


def test_finetune_two_epochs_improves_and_resumes(exported, fm, tmp_path):
    train, test = _subset(fashion_mnist(FM, "train"), 1024, offset=1000), fm[1]
    cfg = _cfg(
        finetune__epochs=2,
        finetune__batch_size=32,
        finetune__warmup_epochs=0.25,
        finetune__base_lr=8e-3,
        finetune__layer_decay=0.75,
        finetune__crop_pct=1.0,
        finetune__log_every=8,
        finetune__crop_scale_min=1.0,
    )  # 16-px images: smaller crops leave too little to learn from
    torch.manual_seed(cfg.seed)
    from conmim.export.encoders import load_pretrained

    before, _ = build_classifier(*load_pretrained(exported), 10, drop_path=0.1)
    test_set = LabeledDataset(test, EvalTransform(16, cfg.data.mean, cfg.data.std))
    initial = evaluate(before, test_set, 64, torch.device("cpu"))["top1"]
    result = finetune(exported, train, test, cfg, out_dir=tmp_path)
    assert result["top1"] > initial + 15.0, (initial, result["history"])
    assert result["best_top1"] == max(h["top1"] for h in result["history"]) and len(result["history"]) == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_top1"] for r in records if "test_top1" in r] == [h["top1"] for h in result["history"]]
    assert any("train_loss" in r for r in records)
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and (tmp_path / "checkpoints" / "best.pt").is_file()
    best = load_encoder(tmp_path / "best.safetensors")  # a timm classifier, strict load
    assert evaluate(best, test_set, 64, torch.device("cpu"))["top1"] == pytest.approx(result["best_top1"])
    again = finetune(exported, train, test, cfg, out_dir=tmp_path)  # resumes at the end: nothing to train
    assert again["history"] == result["history"]


def test_finetune_init_random_starts_from_timms_initialisation_not_the_source(exported, fm, tmp_path):
    """``finetune.init=random``: the from-scratch baseline keeps SOURCE's architecture and recipe but
    starts from timm's initialisation, seeded by ``seed`` (a negligible lr keeps the weights),
    and ``finetune.fresh_scale`` leaves it exactly as timm drew it."""
    from conmim.export.encoders import load_pretrained, random_weights

    train, test = fm
    cfg = _cfg(
        finetune__init="random",
        finetune__fresh_scale=True,
        finetune__epochs=1,
        finetune__batch_size=200,
        finetune__base_lr=1e-12,
    )
    cfg.finetune.min_lr = 0.0
    finetune(exported, train, test, cfg, out_dir=tmp_path)
    tuned = load_encoder(tmp_path / "best.safetensors").state_dict()
    source, spec = load_pretrained(exported)
    torch.manual_seed(cfg.seed)
    scratch = random_weights(spec)
    for key in ("blocks.1.mlp.fc1.weight", "patch_embed.proj.weight", "blocks.1.mlp.fc2.weight"):
        assert torch.allclose(tuned[key], scratch[key], atol=1e-6), key
        assert not torch.allclose(tuned[key], source[key], atol=1e-3), key
    cfg.finetune.init = "imagenet"
    with pytest.raises(ConfigError, match="finetune.init"):
        from conmim.config import validate

        validate(cfg)


def test_finetune_color_jitter_is_a_setting_and_zero_turns_it_off():
    from torchvision import transforms

    from conmim.eval.augment import train_transform

    def jitters(**sections) -> list:
        ops = train_transform(16, _cfg(finetune__auto_augment="", **sections)).ops.transforms
        return [t for t in ops if isinstance(t, transforms.ColorJitter)]

    assert jitters()[0].brightness == (0.6, 1.4)  # timm's default strength 0.4
    assert jitters(finetune__color_jitter=0.2)[0].contrast == (0.8, 1.2)
    assert jitters(finetune__color_jitter=0.0) == []


def test_layer_decay_groups_have_expected_scales():
    spec = timm_spec("vit_tiny", 16, 4, depth=3)
    enc = timm.create_model(spec["model_name"], **spec["kwargs"])
    model, _ = build_classifier(enc.state_dict(), spec, 10)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in layer_decay_groups(model, 0.05, 0.5, decay_rel_pos=False):
        for p in group["params"]:
            seen[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
    assert seen["patch_embed.proj.weight"] == (0.5**4, 0.05) and seen["cls_token"] == (0.5**4, 0.0)
    for i in range(3):
        assert seen[f"blocks.{i}.attn.qkv.weight"] == (0.5 ** (3 - i), 0.05)
        assert seen[f"blocks.{i}.norm1.weight"] == (0.5 ** (3 - i), 0.0)
        assert seen[f"blocks.{i}.attn.relative_position_bias_table"] == (0.5 ** (3 - i), 0.0)
    assert seen["head.weight"] == (1.0, 0.05) and seen["fc_norm.weight"] == (1.0, 0.0)
    assert len(seen) == len(names)
    decayed = {names[id(p)] for g in layer_decay_groups(model, 0.05, 0.5) if g["weight_decay"] for p in g["params"]}
    assert "blocks.0.attn.relative_position_bias_table" in decayed  # official quirk by default


def test_rel_pos_tables_identity_at_same_size_and_resized_at_384():
    table = torch.randn(732, 3)
    assert torch.equal(resize_rel_pos_table(table, (14, 14), (14, 14)), table)
    big = resize_rel_pos_table(table, (14, 14), (24, 24))
    assert big.shape == (47 * 47 + 3, 3)
    assert torch.equal(big[-3:], table[-3:])  # [CLS] entries kept
    assert torch.allclose(big[(47 * 47) // 2], table[(27 * 27) // 2])  # zero offset stays zero offset
    dy = torch.arange(-13, 14).repeat_interleave(27).float()  # a table linear in the row offset ...
    ramp = resize_rel_pos_table(torch.cat([dy, torch.zeros(3)])[:, None], (14, 14), (24, 24))[:-3].reshape(47, 47)
    assert torch.allclose(ramp[[0, -1]], torch.tensor([[-13.0], [13.0]]).expand(2, 47))  # ... keeps its range
    assert (ramp[1:] - ramp[:-1] > 0).all()  # and stays increasing
    spec = timm_spec("vit_tiny", 224, 16, depth=2)
    enc = timm.create_model(spec["model_name"], **spec["kwargs"]).eval()
    with torch.no_grad():
        enc.rel_pos_bias.relative_position_bias_table.normal_()
    same, _ = build_classifier(enc.state_dict(), spec, 10, drop_path=0.0)
    same.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # per-block copies of the shared table: identical block outputs
        ref = enc.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")[0]
        got = same.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")[0]
    assert torch.allclose(ref, got, atol=1e-5)
    model, model_spec = build_classifier(enc.state_dict(), spec, 10, img_size=384)
    assert model_spec["kwargs"]["img_size"] == 384
    expected = resize_rel_pos_table(enc.rel_pos_bias.relative_position_bias_table.detach(), (14, 14), (24, 24))
    for blk in model.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table.detach(), expected)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_cli_monitor_knn_linprobe_finetune(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                *TINY,
                "train.max_steps=4",
                "eval.monitor_every=2",
                "eval.monitor_bank=64",
                "eval.monitor_queries=32",
                f"output_dir={run}",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_top1" in r] == [2, 4]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in records if "knn_top1" in r)
    limits = ["data.train_limit=300", "data.test_limit=100"]
    assert main(["knn", str(run), *limits]) == 0
    knn = json.loads((run / "knn" / "results.json").read_text())
    assert knn["top1"] > 20.0 and knn["train_images"] == 300 and knn["test_images"] == 100
    assert main(["linprobe", str(run / "checkpoints" / "last.pt"), *limits, "linprobe.epochs=3"]) == 0
    assert json.loads((run / "linprobe" / "results.json").read_text())["epochs"] == 3
    assert (
        main(
            [
                "finetune",
                str(run),
                "data.train_limit=32",
                "data.test_limit=16",
                "finetune.epochs=1",
                "finetune.batch_size=16",
                "finetune.which=student",
            ]
        )
        == 0
    )
    assert (run / "finetune" / "checkpoints" / "best.pt").is_file()
    assert main(["knn", str(run), "eval.pool=max"]) == 2  # a clear error, not a traceback
    assert "eval.pool='max'" in capsys.readouterr().err


def test_vit_encoder_with_absolute_positions_transfers_to_another_size():
    spec = timm_spec("vit_tiny", 16, 4, depth=2, encoder="vit")
    enc = timm.create_model(spec["model_name"], **spec["kwargs"])
    model, _ = build_classifier(enc.state_dict(), spec, 10, img_size=32, drop_path=0.0)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 192)
    assert torch.equal(model.pos_embed[:, 0], enc.pos_embed[:, 0])  # the [CLS] position is kept as is
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_probe_head_init_fits_the_head_on_what_the_classifier_feeds_it(exported, fm):
    """Linear probe, then fine-tune: before any fine-tuning step the classifier already classifies."""
    from conmim.eval.finetune import probe_head_init
    from conmim.export.encoders import load_pretrained

    train, test = fm
    cfg = _cfg(finetune__probe_head_epochs=30, finetune__crop_pct=1.0, linprobe__batch_size=64)
    test_set = LabeledDataset(test, EvalTransform(16, cfg.data.mean, cfg.data.std))
    torch.manual_seed(0)
    model, _ = build_classifier(*load_pretrained(exported), 10, drop_path=0.0)
    assert model.head.weight.abs().max() < 1e-3  # the official near-zero head
    before = evaluate(model, test_set, 64, torch.device("cpu"))["top1"]
    blocks = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    train_top1 = probe_head_init(model, train, cfg, torch.device("cpu"), None)
    after = evaluate(model, test_set, 64, torch.device("cpu"))["top1"]
    assert train_top1 > 45.0 and after > 40.0 and after > before + 20.0, (before, train_top1, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in blocks.items())  # only the head moved
    assert model.training  # handed back ready for fine-tuning


def test_head_fit_on_repeated_images_reads_each_once_for_its_passes(exported, fm, tmp_path, monkeypatch):
    """An epoch of copies (the lab's several passes to an epoch): the head fit before fine-tuning reads the
    images once and trains ``probe_head_epochs`` passes over them, whatever an epoch holds."""
    from conmim.eval import finetune as ft

    seen = {}

    def spy(head, batches, steps_per_epoch, p, device, seed=0, log=None):
        features = batches.args[0]  # cached_batches: partial(_cached_batches, x, y, batch_size)
        seen.update(rows=len(features), steps_per_epoch=steps_per_epoch, epochs=p.epochs, warmup=p.warmup_epochs)
        return 0.0

    monkeypatch.setattr(ft, "train_head", spy)
    train, test = fm
    images = _subset(train, 100)
    copies = ArraySource(np.tile(images.images, (3, 1, 1)), np.tile(images.labels, 3), train.classes)
    cfg = _cfg(
        finetune__probe_head_epochs=4,
        finetune__epochs=1,
        finetune__batch_size=100,
        linprobe__batch_size=50,
        linprobe__warmup_epochs=0.5,
    )
    result = ft.finetune(exported, copies, test, cfg, tmp_path, head_images=images)
    assert seen == {"rows": 100, "steps_per_epoch": 2, "epochs": 4, "warmup": 0.5}
    assert result["history"][-1]["epoch"] == 1  # and fine-tuning itself ran its epoch over the copies


@pytest.mark.parametrize(
    "encoder_kind, init_values, writes",
    [("beit", 0.1, "gamma_1"), ("vit", 0.1, "ls1.gamma"), ("vit", 0.0, "attn.proj.weight")],
)
def test_fresh_scale_gives_the_patch_embedding_a_fresh_size_and_keeps_the_head_input(encoder_kind, init_values, writes):
    """``finetune.fresh_scale``: the official initialisation's small patch embedding is scaled to the size of a
    fresh one, with the rest of the residual stream (the layer scales, or each branch's output projection
    without them), so the head receives the same features; timm's own initialisation is left as it is."""
    from conmim.eval.transfer import fresh_stream_factor
    from conmim.export.encoders import random_weights

    torch.manual_seed(0)
    model = ConMIM(**dict(TINY_MODEL_ARGS, encoder=encoder_kind, init_values=init_values))
    weights = {k: v.detach().clone() for k, v in model.teacher.encoder.state_dict().items()}
    built = {}
    for fresh in (False, True):
        torch.manual_seed(0)
        built[fresh], _ = build_classifier(weights, model.spec, 10, drop_path=0.0, fresh_scale=fresh)
        built[fresh].eval()
    patch = built[True].patch_embed.proj.weight
    assert patch.pow(2).mean().sqrt().item() == pytest.approx((3 * patch[0].numel()) ** -0.5, rel=1e-4)
    factor = fresh_stream_factor(weights)
    assert factor > 3.0  # BEiT's +-1 std cut: the pre-training's patch embedding is several times smaller
    plain, scaled = built[False].state_dict(), built[True].state_dict()
    assert torch.allclose(scaled[f"blocks.0.{writes}"], factor * plain[f"blocks.0.{writes}"])
    assert torch.equal(scaled["blocks.0.mlp.fc1.weight"], plain["blocks.0.mlp.fc1.weight"])  # read by a norm
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        head_inputs = [m.forward_head(m.forward_features(images), pre_logits=True) for m in (built[False], built[True])]
    # equal up to LayerNorm's eps (1e-6), which weighs more on the small unscaled stream
    assert torch.allclose(head_inputs[0], head_inputs[1], atol=5e-3 * head_inputs[0].abs().max().item())
    assert fresh_stream_factor(random_weights(model.spec)) == pytest.approx(1.0, abs=0.05)
