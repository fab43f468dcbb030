"""PreCrop: channel cropping at initialization from pruning-at-init scores."""
