"""dist_seg: distributed semantic segmentation on COCO-format datasets."""

__version__ = "0.1.0"
