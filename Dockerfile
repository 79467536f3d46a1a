# MLPerf Training Mask R-CNN (TF 2.20 / tf_keras) on the official TensorFlow GPU image, whose
# TensorFlow and Python (3.11) match the pins in setup.cfg.
#
#   docker build -t official_maskrcnn .
#   docker run --gpus all --rm --shm-size=4g -v /data/coco2017:/data -v /runs:/runs \
#       -e DATA_DIR=/data -e MODEL_DIR=/runs/r1 official_maskrcnn
# (--shm-size: the eval workers read val2017's 1.6 GB of mask probabilities from /dev/shm;
# Docker's default 64 MB makes them fall back to slower pipes.)
FROM tensorflow/tensorflow:2.20.0-gpu

# wget/unzip for download_dataset.sh; gcc and the Python headers for the package's one C
# extension (the mask paster, official_maskrcnn/evaluation/_mask_rle.c).
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget unzip gcc \
       "$(python -c 'import sys; print("python%d.%d-dev" % sys.version_info[:2])')" \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/maskrcnn
COPY . .
# Editable install: the pins of setup.cfg (tensorflow~=2.20.0 is already satisfied by the image).
RUN python -m pip install --no-cache-dir -e .

# Stream training output (and its :::MLLOG lines) without buffering.
ENV PYTHONUNBUFFERED=1
CMD ["./run_and_time.sh"]
