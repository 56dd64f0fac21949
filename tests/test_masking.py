import statistics

import pytest
import torch
from torch.utils.data import DataLoader

from conmim.data import EpochSampler, PretrainDataset, SyntheticSource
from conmim.masking import MaskGenerator, block_mask, random_unit_mask
from conmim.views import PairedViews


def test_random_unit_official_count():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = MaskGenerator((14, 14), "random_unit", 0.75, unit=2)(g)
        assert mask.shape == (196,) and mask.dtype == torch.bool
        assert int(mask.sum()) == 148  # ceil(49 * 0.75) = 37 units of 2x2 patches


def test_random_unit_masks_whole_units():
    g = torch.Generator().manual_seed(1)
    mask = random_unit_mask((8, 12), 0.5, 4, g).view(8, 12)
    units = mask.view(2, 4, 3, 4).permute(0, 2, 1, 3).reshape(6, 16)
    assert bool(((units.sum(1) == 0) | (units.sum(1) == 16)).all())
    assert int(mask.sum()) == 3 * 16


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (7, 9), (24, 24)])
def test_block_never_above_target_and_close_on_average(grid):
    g = torch.Generator().manual_seed(0)
    target = round(0.4 * grid[0] * grid[1])
    counts = [int(block_mask(grid, 0.4, min_patches=4 if grid[0] < 10 else 16, generator=g).sum()) for _ in range(200)]
    assert max(counts) <= target
    assert statistics.mean(counts) >= 0.95 * target


@pytest.mark.parametrize("grid", [(7, 7), (6, 10)])
def test_random_any_grid(grid):
    mask = MaskGenerator(grid, "random", 0.6)(torch.Generator().manual_seed(0))
    assert mask.shape == (grid[0] * grid[1],) and int(mask.sum()) == round(0.6 * grid[0] * grid[1])


def test_grid_that_does_not_divide_into_units_is_a_clear_error():
    with pytest.raises(ValueError, match="7x7 does not divide into mask units of 2x2"):
        MaskGenerator((7, 7), "random_unit", 0.75, unit=2)


def test_masks_differ_across_workers_and_epochs():
    dataset = PretrainDataset(SyntheticSource(64, 16), PairedViews(16), MaskGenerator((4, 4), "random", 0.5))
    sampler = EpochSampler(len(dataset), 8, seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=2)
    masks = []
    for i, (_w, _s, mask) in enumerate(loader):
        masks.append(mask)
        if i == 15:  # two epochs of 8 batches, batches alternate between the two workers
            break
    flat = torch.cat(masks)
    distinct = {tuple(m.tolist()) for m in flat}
    assert len(distinct) > 0.8 * len(flat)  # C(16, 8) = 12,870 possible masks; repeats would be rare
    # worker 0 made batch 0, worker 1 batch 1: their masks must differ
    assert not torch.equal(masks[0], masks[1])
    # the same image in epoch 0 and epoch 1 gets a different mask
    assert not torch.equal(dataset[(0, 3)][2], dataset[(1, 3)][2])
    # and the same (epoch, index) always gets the same mask, in any process
    assert torch.equal(dataset[(0, 3)][2], dataset[(0, 3)][2])
