"""Data: COCO -> shards once (prep), the shard format (format), shards -> batches at every step (loading)."""

IGNORE_INDEX = 255
"""The label value of ignored pixels everywhere: in the shards, crop and eval padding, the loss and metrics.
255 because masks are uint8 PNGs; it is not configurable."""
