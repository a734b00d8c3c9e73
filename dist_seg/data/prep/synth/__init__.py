"""`dist-seg synth`: a synthetic COCO dataset of drawn shapes (dataset) and the drawing (draw)."""
