"""COCO -> shards, run once before training: reading and checking COCO (coco, images), rasterising
instances into label maps (raster), `dist-seg convert | split | eda | synth`."""
