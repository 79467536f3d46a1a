"""COCO -> TFRecord tools: synthetic COCO generator, converter and record verifier."""

__version__ = "0.1.0"
