"""A ConMIM training loop of your own, on your own images or tensors.

``conmim pretrain`` wraps all of this (data loading, schedules, checkpoints, non-finite-step
guards); this script shows the few calls underneath, for when you want the loop in your own code:

1. ``conmim.ConMIM``: student (timm encoder + mask token + projector) and its EMA teacher.
2. ``PairedViews``: one shared crop and flip per image, giving the student's weak view and the
   teacher's strong (photometrically perturbed) view.
3. ``conmim.MaskGenerator``: which patches of the student's view are masked (True = masked).
4. ``loss = model(weak, strong, mask)``, backward, optimizer step, ``model.update_teacher(momentum)``.

Run it (random tensors, or ``--images`` a folder of image files):

    python examples/custom_loop.py --steps 5 --batch-size 8 --img-size 32
    python examples/custom_loop.py --images path/to/jpegs --steps 20
"""

from __future__ import annotations

import argparse
import math

import torch

import conmim
from conmim.data.sources import image_folder
from conmim.data.views import IMAGENET_MEAN, IMAGENET_STD


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=32, help="side of the square views, in pixels")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--depth", type=int, default=2, help="transformer blocks (vit_tiny has 12)")
    p.add_argument("--images", help="folder of image files (searched recursively); default: random tensors")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load_images(args: argparse.Namespace) -> list:
    """Your data: a list of PIL images or uint8 (C, H, W) tensors, any size (the views crop and resize)."""
    if args.images:
        source = image_folder(args.images)  # every image file under the folder, read as RGB
        return [source[i][0] for i in range(len(source))]  # source[i] is (image, label); labels are unused
    gen = torch.Generator().manual_seed(args.seed)
    return list(torch.randint(0, 256, (4 * args.batch_size, 3, 40, 40), dtype=torch.uint8, generator=gen))


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)  # the model's initialisation
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # A small model. The defaults are the paper's (vit_small at 224 px, patch 16, a 4096-wide projector);
    # encoder="beit" (default) is the official layout, encoder="vit" timm's VisionTransformer.
    model = conmim.ConMIM(
        arch="vit_tiny",
        img_size=args.img_size,
        patch_size=args.patch_size,
        depth=args.depth,
        proj_hidden_dim=256,
        proj_out_dim=64,
    ).to(device)

    # The views and masks that `conmim pretrain` uses (conmim.data.pretrain.PretrainDataset): the mean and
    # std normalise both views; crop_scale is RandomResizedCrop's area range (0.08 at ImageNet scale).
    views = conmim.PairedViews(args.img_size, crop_scale=(0.25, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    grid = model.student.grid_size  # (img_size / patch_size,) * 2
    # random_unit: 75 % of the grid in units of 2x2 patches (the official random_mps32); "block" is BEiT's.
    masks = conmim.MaskGenerator(grid, kind="random_unit", ratio=0.75, unit=2)

    images = load_images(args)
    if len(images) < args.batch_size:
        raise SystemExit(f"{len(images)} images cannot fill a batch of {args.batch_size}")

    # AdamW on the student only: the teacher gets no gradients, it follows the student by EMA.
    # (conmim.train.optim.build_adamw gives the official parameter groups: no decay on norms and biases.)
    params = [p for p in model.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)

    gen = torch.Generator().manual_seed(args.seed)  # all data randomness: crops, flips, photometric ops, masks
    model.train()
    for step in range(args.steps):
        order = torch.randperm(len(images), generator=gen)[: args.batch_size]
        weak, strong, mask = [], [], []
        for i in order.tolist():
            w, s = views(images[i], gen)  # normalised float (C, H, W) each, of the same crop
            weak.append(w)
            strong.append(s)
            mask.append(masks(gen))  # (N,) bool, N = patches of the grid
        weak, strong, mask = (torch.stack(x).to(device) for x in (weak, strong, mask))

        # Denoising contrast: each masked patch of the student's weak view must pick out the teacher's
        # token at the same position of the strong view among all the image's teacher tokens.
        # (model.forward_with_stats(...) returns (loss, retrieval accuracy).)
        loss = model(weak, strong, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()

        # EMA teacher: momentum rises from 0.99 to 1 over the run (cosine), as `conmim pretrain` does.
        momentum = conmim.teacher_momentum(step, args.steps, start=0.99, end=1.0)
        model.update_teacher(momentum)

        value = loss.item()
        print(f"step {step + 1}/{args.steps}  loss {value:.4f}  momentum {momentum:.4f}", flush=True)
        if not math.isfinite(value):
            raise SystemExit("non-finite loss")

    # model.teacher.encoder (what the authors fine-tune) and model.student.encoder are plain timm models:
    # torch.save(model.teacher.encoder.state_dict(), "encoder.pth") loads into
    # timm.create_model(model.spec["model_name"], **model.spec["kwargs"]).
    print(f"done: {args.steps} steps, teacher encoder {type(model.teacher.encoder).__name__}")


if __name__ == "__main__":
    main()
