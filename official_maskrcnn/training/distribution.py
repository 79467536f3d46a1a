"""The tf.distribute strategy of a run: default, one host with several devices, or several hosts.

The same training code serves all three; only this choice differs (DESIGN.md, "Distribution").
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def build_strategy(kind="default", num_gpus=None):
    """Creates the strategy. Call before any other TensorFlow op (multi-worker needs that).

    Args:
      kind: "default" (one device: CPU or the first GPU), "mirrored" (`MirroredStrategy` over
        the local GPUs, or over the logical CPU devices when there is no GPU), "multi_worker"
        (`MultiWorkerMirroredStrategy`; the cluster comes from the `TF_CONFIG` environment
        variable, every worker runs the same command).
      num_gpus: "mirrored" only: use the first `num_gpus` GPUs (None: all visible ones).
    Returns:
      a `tf.distribute.Strategy`.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, found {kind!r}")
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' needs the TF_CONFIG environment variable "
                             "(cluster and task of this worker); none is set")
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    if num_gpus is not None:
        if num_gpus > len(devices):
            raise ValueError(f"num_gpus={num_gpus} but only {len(devices)} device(s) are visible: "
                             f"{devices}")
        devices = devices[:num_gpus]
    # On CPU devices TF would all-reduce with collective ops, whose instance keys restart with
    # every MirroredStrategy: a second strategy in the same process (evaluate after train,
    # tests) then collides with the first and aborts all collectives. Reducing on one device
    # has no such state; GPUs keep TF's choice (NCCL).
    cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def worker_info(strategy):
    """(task index, number of workers) of this process; (0, 1) without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0, 1
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    num_workers = len(tf_config.get("cluster", {}).get("worker", [])) or 1
    return int(resolver.task_id or 0), num_workers
