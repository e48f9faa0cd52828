"""masksweep: hyperparameter sweeps for Mask R-CNN person instance segmentation."""

__version__ = "0.1.0"
