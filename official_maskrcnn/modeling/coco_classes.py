"""The class count of COCO inside the model: 80 categories + background.

Labels are contiguous, 1..80 for the categories and 0 for background (the converter maps COCO's
category ids 1..90 onto them); every class count in `modeling/` includes the background.
"""

NUM_CLASSES_COCO = 81
