"""Images in: sources (folders, list files, Fashion-MNIST, synthetic), paired views, masks, the pre-training dataset."""
