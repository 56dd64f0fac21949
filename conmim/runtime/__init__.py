"""What every command shares: device and precision, autocast, seeding, processes, checkpoints, metrics."""

from .device import autocast, resolve_device, resolve_precision

__all__ = ["autocast", "resolve_device", "resolve_precision"]
