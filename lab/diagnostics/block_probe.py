"""Which block's frozen features does a linear classifier read best, and how do they compare with the pixels?

The label-efficiency study's encoders trail a logistic regression on the raw pixels at 600 and 6,000
labels. This asks where the information goes: for each pre-training run, the mean-pooled tokens of
every block (after the final norm, as the study's probe and k-NN see the last one) are classified by
the raw-pixel reference's logistic regression (:mod:`lab.references`: standardised inputs, C chosen on
the same 5,000 validation images, its grid widened by a decade upwards since features chose its edge;
the test split read once), on the study's class-balanced label subset of the run's seed. ``random`` is
the encoder at timm's initialisation (seeded), the floor of an untrained network of the same shape.
``--pool grid`` averages the token map over 2 x 2 quadrants instead of over the whole image (4 x the
width, about the pixels' 784 values for width 192): does the mean over the image lose what the pixels
keep, where each garment part lies?

Usage (from the repository root, after the study's pre-trainings)::

    python -m lab.diagnostics.block_probe runs/label_efficiency_cpu/conmim_s0/pretrain random_s0 \
        --fractions 0.01 0.1 --out lab/records/label_efficiency_cpu/block_probe.jsonl

A run folder's seed is read from its name (``..._sSEED/pretrain``); ``random_sSEED`` takes the first
run's architecture. One JSON line per (run, pooling, fraction), appended; a line already there is skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from conmim.config import Config
from conmim.eval.common import EvalTransform, LabeledDataset
from conmim.export.encoders import build_encoder, load_pretrained, random_weights
from lab.provenance import commit, machine
from lab.references import reference
from lab.study import balanced_subset, load_study, study_splits
from lab.sweep import validation_indices


def seed_of(name: str) -> int:
    found = re.search(r"_s(\d+)(?:/pretrain)?/?$", name)
    if found is None:
        raise SystemExit(f"block_probe: cannot read a seed from {name!r} (expected ..._sSEED/pretrain or random_sSEED)")
    return int(found.group(1))


POOLS = ("mean", "grid")
C_GRID = [1e-3, 1e-2, 1e-1, 1.0, 10.0]


@torch.no_grad()
def block_features(encoder: torch.nn.Module, dataset: LabeledDataset, pool: str) -> np.ndarray:
    """(blocks, N, D or 4 D): every block's patch tokens after the final norm, pooled, fp32."""
    encoder.eval()
    out = []
    for images, _ in tqdm(DataLoader(dataset, batch_size=256), desc="features", leave=False):
        maps = encoder.forward_intermediates(images, indices=len(encoder.blocks), norm=True, intermediates_only=True)
        if pool == "mean":
            out.append(torch.stack([m.mean((2, 3)) for m in maps]))
        else:  # (B, D, H, W) -> (B, D * 4): the mean of each quadrant
            out.append(torch.stack([F.adaptive_avg_pool2d(m, 2).flatten(1) for m in maps]))
    return torch.cat(out, 1).float().numpy()


def probe_run(name: str, first_run: str, fractions: list[float], preset: str, pool: str) -> list[dict]:
    """One row per fraction: the logistic regression's test top-1 on each block's features."""
    study, base = load_study(preset)
    train, test = study_splits(study, OmegaConf.select(base, "data.path", default=None) or Config().data.path)
    seed = seed_of(name)
    if name.startswith("random"):
        torch.manual_seed(seed)
        spec = load_pretrained(first_run)[1]
        encoder = build_encoder(random_weights(spec), spec)
    else:
        encoder = build_encoder(*load_pretrained(name))
    cfg = OmegaConf.load(Path(first_run if name.startswith("random") else name) / "config.yaml")
    transform = EvalTransform(cfg.model.img_size, cfg.data.mean, cfg.data.std)
    below_one = [f for f in study.label_fractions if f < 1]
    val = validation_indices(train, balanced_subset(train, max(below_one), seed), 500, seed)
    subsets = {f: balanced_subset(train, f, seed) for f in fractions}
    needed = np.union1d(val, np.concatenate(list(subsets.values())))
    start = time.perf_counter()
    feats = block_features(encoder, LabeledDataset(train, transform, needed.tolist()), pool)
    test_feats = block_features(encoder, LabeledDataset(test, transform), pool)
    y, test_y = np.asarray(train.labels), np.asarray(test.labels)
    rows = []
    for fraction, labelled in subsets.items():
        by_block = []
        for block, test_x in enumerate(test_feats):
            x = np.zeros((len(train), feats.shape[2]), np.float32)  # indexed like the training split
            x[needed] = feats[block]
            result = reference("raw_logreg", x, y, labelled, val, (test_x, test_y), C_GRID)
            by_block.append({"block": block + 1, "chosen_C": result["chosen"]["C"], "test_top1": result["test_top1"]})
            print(f"{name} {pool} fraction {fraction:g} block {block + 1}: top-1 {result['test_top1']:.2f}", flush=True)
        rows.append(
            {
                "run": name,
                "pool": pool,
                "seed": seed,
                "fraction": fraction,
                "labels": len(labelled),
                "by_block": by_block,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.diagnostics.block_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="pre-training run folders (..._sSEED/pretrain) or random_sSEED")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1])
    parser.add_argument("--pool", choices=POOLS, default="mean", help="over the image, or over each quadrant")
    parser.add_argument("--preset", default="study_labels", help="the label-efficiency study preset")
    parser.add_argument("--out", type=Path, default=Path("lab/records/label_efficiency_cpu/block_probe.jsonl"))
    args = parser.parse_args(argv)
    first_run = next((r for r in args.runs if not r.startswith("random")), None)
    if first_run is None:
        parser.error("name at least one run folder (random_sSEED takes its architecture)")
    done = (
        {(r["run"], r["fraction"]) for r in map(json.loads, args.out.read_text().splitlines())}
        if args.out.is_file()
        else set()
    )
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    for name in args.runs:
        wanted = [f for f in args.fractions if (name, args.pool, f) not in done]
        if not wanted:
            continue
        with threadpool_limits(1):
            rows = probe_run(name, first_run, wanted, args.preset, args.pool)
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps({**row, "machine": machine(), "commit": commit()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
