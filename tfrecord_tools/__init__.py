"""COCO -> TFRecord tools: synthetic COCO generator, converter and record verifier."""

__version__ = "0.1.0"

# The entries that import TensorFlow keep its C++ chatter off the console when run as commands
# (`quiet_tensorflow`); importing the package changes nothing.
