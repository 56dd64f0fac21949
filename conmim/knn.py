"""Encoder features and the weighted k-NN classifier (cosine similarity, temperature voting)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm


class EvalTransform:
    """Resize the shorter side to ``img_size / crop_pct`` (bicubic), centre-crop, normalise."""

    def __init__(self, img_size: int, mean, std, crop_pct: float = 1.0):
        self.img_size, self.resize = img_size, int(round(img_size / crop_pct))
        self.mean, self.std = list(mean), list(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = TF.resize(img.convert("RGB"), [self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [self.img_size, self.img_size])
        return TF.normalize(TF.pil_to_tensor(img).float().div_(255), self.mean, self.std)


class LabeledDataset(Dataset):
    """A source of ``(PIL image, label)`` seen through a deterministic transform."""

    def __init__(self, source, transform, indices: list[int] | None = None):
        self.source, self.transform = source, transform
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.source[self.indices[i]]
        return self.transform(img), label


def pool_tokens(tokens: torch.Tensor, pool: str = "cls", num_prefix: int = 1) -> torch.Tensor:
    """(B, T, D) -> (B, D): the [CLS] token, or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, num_prefix:].mean(1)


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, batch_size: int = 256, pool: str = "cls",
                     device: str | torch.device = "cpu", num_workers: int = 0,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) in fp32 and labels (N,) of a timm encoder over a labelled dataset."""
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    device = torch.device(device)
    for images, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = encoder.forward_features(images.to(device, non_blocking=True))
        feats.append(pool_tokens(tokens, pool).float().cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Class scores (M, C): each test sample's k most cosine-similar training samples vote
    with weight exp(similarity / temperature)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)
    out = []
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> float:
    """Top-1 accuracy (%) of :func:`knn_predict`."""
    scores = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return 100.0 * (scores.argmax(1) == test_labels).float().mean().item()


def spread_indices(size: int, limit: int) -> list[int] | None:
    """``limit`` evenly spaced indices of ``range(size)`` (None = all), a deterministic subset."""
    if limit <= 0 or limit >= size:
        return None
    return torch.linspace(0, size - 1, limit).round().long().tolist()


def knn_on_splits(encoder: nn.Module, data_cfg, img_size: int, k: int = 20, temperature: float = 0.07,
                  pool: str = "cls", batch_size: int = 256, device: str | torch.device = "cpu",
                  max_train: int = 0, max_test: int = 0, train_split: str = "train",
                  test_split: str = "test") -> float:
    """k-NN top-1 (%) of an encoder: train split as memory bank, test split as queries."""
    from .data import build_source

    transform = EvalTransform(img_size, data_cfg.mean, data_cfg.std)
    feats = []
    for split, limit in ((train_split, max_train), (test_split, max_test)):
        source = build_source(data_cfg, img_size, split)
        dataset = LabeledDataset(source, transform, spread_indices(len(source), limit))
        feats.append(extract_features(encoder, dataset, batch_size, pool, device, data_cfg.num_workers,
                                      desc=f"k-NN {split} features"))
    (train_x, train_y), (test_x, test_y) = feats
    return knn_accuracy(train_x, train_y, test_x, test_y, k, temperature)
