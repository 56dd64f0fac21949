"""Dense transfer: a ViT encoder as a feature pyramid, built-in scenes, semantic segmentation (docs/dense.md)."""
