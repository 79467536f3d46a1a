"""Inference outside training: image files in, detections in original pixels out."""
