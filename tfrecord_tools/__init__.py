"""COCO -> TFRecord tools: synthetic COCO generator, converter and record verifier."""

import os

__version__ = "0.1.0"

# These are command-line tools: keep TensorFlow's C++ INFO chatter (oneDNN, CPU features, CUDA
# probing) out of their output. Set before any TensorFlow import; an explicit setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
