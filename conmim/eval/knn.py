"""Encoder features and the weighted k-NN classifier (cosine similarity, temperature voting)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import ConfigError
from ..data.sources import build_source
from ..runtime.device import autocast
from .common import EvalTransform, LabeledDataset, SourceSubset, UnlabelledError

log = logging.getLogger(__name__)


def encode(encoder: nn.Module, images: torch.Tensor, pool: str = "mean", block: int = -1) -> torch.Tensor:
    """(B, D) features: one block's [CLS] token or mean patch token, after the final norm.

    ``block=-1`` is the last block, i.e. exactly ``forward_features``. A fine-tuned model (mean
    pooling + fc_norm, final norm removed) gets its fc_norm on the mean, as its head sees it.
    """
    depth = len(encoder.blocks)
    if not -depth <= block < depth:
        raise ConfigError(f"block={block} is outside the encoder's {depth} blocks (use -1 for the last)")
    ((patches, prefix),) = encoder.forward_intermediates(
        images,
        indices=[block % depth],
        norm=True,
        output_fmt="NLC",
        return_prefix_tokens=True,
        intermediates_only=True,
        stop_early=True,
    )
    if pool == "cls":
        return prefix[:, 0]
    fc_norm = getattr(encoder, "fc_norm", None)
    mean = patches.mean(1)
    return fc_norm(mean) if fc_norm is not None and block % depth == depth - 1 else mean


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    pool: str = "mean",
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "features",
    block: int = -1,
    amp_dtype: torch.dtype | str | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) in fp32 and labels (N,) of a timm encoder over a labelled dataset.

    ``amp_dtype``: autocast dtype of the forward pass, None for fp32; ``auto`` is bf16 on GPU only.
    """
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    device = torch.device(device)
    if amp_dtype == "auto":
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    for images, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        with autocast(device, amp_dtype):
            feats.append(encode(encoder, images.to(device, non_blocking=True), pool, block).float().cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (M, C): each test sample's k most cosine-similar training samples vote
    with weight exp(similarity / temperature)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)
    out = []
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy (%) of :func:`knn_predict`."""
    scores = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return 100.0 * (scores.argmax(1) == test_labels).float().mean().item()


def knn_top1(
    encoder: nn.Module,
    train_source,
    test_source,
    transform,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "mean",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    amp_dtype: torch.dtype | str | None = "auto",
) -> float:
    """k-NN top-1 (%) of an encoder: ``train_source`` as memory bank, ``test_source`` as queries."""
    feats = [
        extract_features(
            encoder,
            LabeledDataset(src, transform),
            batch_size,
            pool,
            device,
            num_workers,
            desc=f"k-NN {name} features",
            amp_dtype=amp_dtype,
        )
        for name, src in (("bank", train_source), ("query", test_source))
    ]
    (train_x, train_y), (test_x, test_y) = feats
    return knn_accuracy(train_x, train_y, test_x, test_y, k, temperature)


class KnnMonitor:
    """Online k-NN during pre-training (solo-learn style): is the encoder learning before the run ends?

    A memory bank and disjoint queries are drawn once, with a fixed seed, from the labelled
    pre-training images and seen through the evaluation transform, so every check is comparable.
    """

    def __init__(
        self,
        source,
        img_size: int,
        mean,
        std,
        bank: int = 2000,
        queries: int = 1000,
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "mean",
        batch_size: int = 256,
        seed: int = 0,
    ):
        queries = min(queries, len(source) // 2)
        bank = min(bank, len(source) - queries)
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
        self.bank, self.queries = SourceSubset(source, order[:bank]), SourceSubset(source, order[bank : bank + queries])
        if self.bank.labels is not None and min(self.bank.labels + self.queries.labels) < 0:
            raise UnlabelledError(
                "eval.monitor_every needs labelled images (class sub-folders, list-file labels "
                "or Fashion-MNIST); this data source has unlabelled ones"
            )
        self.transform = EvalTransform(img_size, mean, std)
        self.k, self.temperature, self.pool, self.batch_size = k, temperature, pool, batch_size

    @classmethod
    def from_config(cls, cfg) -> KnnMonitor | None:
        """The monitor of a :class:`conmim.config.Config` (its pre-training source and ``eval`` section),
        or None with a warning when that source is unlabelled (the monitor is on in the built-in
        preset, and pointing that preset at an unlabelled folder must still run)."""
        e = cfg.eval
        try:
            return cls(
                build_source(cfg.data, cfg.model.img_size, in_chans=cfg.model.in_chans),
                cfg.model.img_size,
                cfg.data.mean,
                cfg.data.std,
                e.monitor_bank,
                e.monitor_queries,
                e.knn_k,
                e.knn_t,
                e.pool,
                e.batch_size,
                cfg.seed,
            )
        except UnlabelledError as err:
            log.warning("online k-NN monitor off: %s", err)
            return None

    def __call__(
        self, encoder: nn.Module, device: str | torch.device = "cpu", amp_dtype: torch.dtype | str | None = "auto"
    ) -> dict[str, float]:
        return {
            "knn_top1": knn_top1(
                encoder,
                self.bank,
                self.queries,
                self.transform,
                self.k,
                self.temperature,
                self.pool,
                self.batch_size,
                device,
                amp_dtype=amp_dtype,
            )
        }
