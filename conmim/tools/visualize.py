"""``conmim visualize``: the paper's attention figure and the masked-patch retrieval map, as PNG.

Attention: the [CLS]-to-patch self-attention of the encoder's last block, averaged over heads and
overlaid on the input. timm's attention modules use fused SDPA and never materialise the weights,
so :func:`last_block_attention` captures the last block's input with a forward pre-hook and
recomputes softmax(q k^T / sqrt(d) + relative position bias) from that block's own qkv weights.

Retrieval map (pre-training checkpoints only; it needs both projectors): each masked patch of the
student's masked view is matched against all teacher patches of the unmasked image, as in the loss,
and shown as the pixels of the patch it picks (green frame = its own position, red = another).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..config import Config, ConfigError
from ..eval.common import EvalTransform, check_channels


def _colormap(name: str = "inferno"):
    try:
        import matplotlib
    except ImportError:
        raise ImportError("conmim visualize needs matplotlib: pip install 'conmim[viz]'") from None
    return matplotlib.colormaps[name]


def _block_rel_pos_bias(attn: nn.Module) -> torch.Tensor:
    """(1, heads, T, T) relative position bias of a BEiT block's own table (fine-tuned models).

    timm has no public accessor for a block's own bias, so this is the same table lookup as its private one.
    """
    tokens = attn.relative_position_index.shape[0]  # patches + [CLS]
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(tokens, tokens, -1)
    return bias.permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def last_block_attention(encoder: nn.Module, images: torch.Tensor, run=None) -> torch.Tensor:
    """Attention probabilities of the last block, (B, heads, T, T), for a timm BEiT or ViT encoder.

    ``run`` is the forward to execute (default ``encoder.forward_features``); a masked forward such
    as ``Branch.features`` can be passed instead, since only the last block's input is captured.
    """
    block = encoder.blocks[-1]
    captured: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        captured["x"] = args[0]
        captured["bias"] = kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 else None)

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        (run or encoder.forward_features)(images)
    finally:
        handle.remove()
    attn = block.attn
    x = block.norm1(captured["x"])
    b, t, _ = x.shape
    if getattr(attn, "q_bias", None) is not None:  # BEiT: q and v biases, no k bias
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)
    else:
        qkv = attn.qkv(x)
    q, k, _v = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if getattr(attn, "relative_position_bias_table", None) is not None:
        logits = logits + _block_rel_pos_bias(attn)
    if captured["bias"] is not None:
        logits = logits + captured["bias"]
    return logits.softmax(-1)


def cls_attention_map(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) head-averaged attention of [CLS] to each patch, rows summing to the patch share."""
    attn = last_block_attention(encoder, images).mean(1)  # (B, T, T)
    h, w = encoder.patch_embed.grid_size
    prefix = attn.shape[-1] - h * w
    return attn[:, 0, prefix:].reshape(-1, h, w)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """The input beside the input with the heat map (min-max scaled, bicubic-upsampled) blended on top."""
    size = image.size
    heat = F.interpolate(heat[None, None].float(), size=(size[1], size[0]), mode="bicubic", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colored = (_colormap()(heat.numpy())[..., :3] * 255).astype("uint8")
    blended = Image.blend(image.convert("RGB"), Image.fromarray(colored), alpha)
    canvas = Image.new("RGB", (2 * size[0], size[1]))
    canvas.paste(image.convert("RGB"), (0, 0))
    canvas.paste(blended, (size[0], 0))
    return canvas


@torch.no_grad()
def retrieval_choices(model, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For every patch, the index of the teacher patch the student's masked-view token is most similar to."""
    student = F.normalize(model.student(image, mask[None]).float(), dim=-1)
    teacher = F.normalize(model.teacher(image).float(), dim=-1)
    return (student @ teacher.transpose(1, 2))[0].argmax(-1)


def retrieval_picture(
    image: Image.Image, mask: torch.Tensor, choices: torch.Tensor, grid: tuple[int, int]
) -> Image.Image:
    """Three panels: the input with masked patches darkened; each masked patch replaced by the pixels
    of the patch the student picked (a correct pick restores the image); green = own patch, red = another."""
    size = image.size
    ph, pw = size[1] // grid[0], size[0] // grid[1]
    rgb = image.convert("RGB")
    masked_view, picked = rgb.copy(), rgb.copy()
    shade, frame = ImageDraw.Draw(masked_view, "RGBA"), ImageDraw.Draw(picked, "RGBA")
    correct = 0
    for i in torch.nonzero(mask).flatten().tolist():
        (r, c), (rr, cc) = divmod(i, grid[1]), divmod(int(choices[i]), grid[1])
        box = (c * pw, r * ph, (c + 1) * pw, (r + 1) * ph)
        shade.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(0, 0, 0, 190))
        picked.paste(rgb.crop((cc * pw, rr * ph, (cc + 1) * pw, (rr + 1) * ph)), box[:2])
        own = int(choices[i]) == i
        correct += own
        frame.rectangle(
            (box[0], box[1], box[2] - 1, box[3] - 1),
            outline=(0, 220, 0) if own else (230, 0, 0),
            width=max(1, min(ph, pw) // 10),
        )
    heat = torch.zeros(grid)
    heat.view(-1)[mask] = (choices[mask] == torch.nonzero(mask).flatten()).float() * 2 - 1
    canvas = Image.new("RGB", (3 * size[0], size[1]))
    for k, panel in enumerate((masked_view, picked, _correctness(heat, size))):
        canvas.paste(panel, (k * size[0], 0))
    return canvas


def _correctness(cells: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """Grid of -1 (wrong pick, red), 0 (visible patch, grey), +1 (own patch picked, green), nearest-upsampled."""
    palette = torch.tensor([[200, 30, 30], [90, 90, 90], [30, 180, 30]], dtype=torch.uint8)
    small = Image.fromarray(palette[(cells + 1).long()].numpy())
    return small.resize(size, Image.NEAREST)


def load_for_visualization(source: str | Path, which: str = "teacher") -> tuple[nn.Module, Any, Config]:
    """(encoder, pre-training model or None, config) from a run folder, checkpoint or exported file."""
    from ..export.encoders import config_of, load_encoder, load_run_checkpoint
    from ..models import pretraining_model

    source = Path(source)
    if source.suffix == ".safetensors":
        return load_encoder(source).eval(), None, Config()
    state, _path = load_run_checkpoint(source)
    cfg = config_of(state)
    model = pretraining_model(cfg.model)
    model.load_state_dict(state["model"])
    model.eval()
    encoder = getattr(model, which).encoder
    return encoder, model if cfg.model.objective == "conmim" else None, cfg


def image_inputs(paths: list[str | Path]) -> list[Path]:
    """The image files named by ``paths``: a file as it is, a folder as the image files directly in
    it (by extension, sorted by name; other files are skipped). Each file must open as an image, an
    empty folder or a missing path is an error, and two inputs with one stem would write the same
    PNG names, so they are refused too."""
    from ..data.sources import IMAGE_EXTENSIONS, DataError

    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise DataError(f"{path}: a folder with no image files ({', '.join(IMAGE_EXTENSIONS)}) directly in it")
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such image file or folder")
    stems: dict[str, Path] = {}
    for path in files:
        try:
            with Image.open(path):  # reads the header only
                pass
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not an image file that PIL can read ({err})") from None
        if path.stem in stems:
            raise DataError(f"{stems[path.stem]} and {path} would both write {path.stem}_*.png; rename one")
        stems[path.stem] = path
    return files


def visualize(
    source: str | Path, images: list[str | Path], out: str | Path, which: str = "teacher", seed: int = 0
) -> list[Path]:
    """Write ``NAME_attention.png`` (and ``NAME_retrieval.png`` for ConMIM checkpoints) per image
    of ``images`` (files or folders, see :func:`image_inputs`)."""
    from ..data.masking import MaskGenerator
    from ..data.sources import load_image

    images = image_inputs(images)  # every input checked before the model is loaded or a file written
    encoder, model, cfg = load_for_visualization(source, which)
    channels = int(encoder.patch_embed.proj.in_channels)
    if channels not in (1, 3):
        raise ConfigError(f"conmim visualize draws photos: a {channels}-channel encoder is not supported (1 or 3)")
    check_channels(encoder, cfg.data.mean)
    size = encoder.patch_embed.img_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    transform = EvalTransform(size, cfg.data.mean, cfg.data.std)
    masks = MaskGenerator.from_config(cfg.mask, size, size // encoder.patch_embed.grid_size[0])
    mean, std = torch.tensor(cfg.data.mean)[:, None, None], torch.tensor(cfg.data.std)[:, None, None]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(images):
        x = transform(load_image(path))[None]
        pixels = (((x[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)).numpy()
        shown = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        stem = Path(path).stem
        written.append(out / f"{stem}_attention.png")
        overlay(shown, cls_attention_map(encoder, x)[0]).save(written[-1])
        if model is not None:
            mask = masks(torch.Generator().manual_seed(seed * 1_000_003 + i))
            choices = retrieval_choices(model, x, mask)
            written.append(out / f"{stem}_retrieval.png")
            retrieval_picture(shown, mask, choices, tuple(encoder.patch_embed.grid_size)).save(written[-1])
    return written
