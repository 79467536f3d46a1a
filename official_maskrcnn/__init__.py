"""MLPerf Training Mask R-CNN (ResNet-50-FPN on COCO 2017) in TensorFlow 2 / Keras."""
