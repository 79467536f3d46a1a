"""pytest setup shared by all tests."""

import tensorflow as tf
from absl import flags

# tf.test.TestCase helpers (create_tempdir, ...) read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

# One op at a time: with TensorFlow's default inter-op parallelism, two identical smoke runs
# gave different weights on an Intel Xeon with AMX (sum|w| apart by ~1e-7 relative; neither
# oneDNN off, intra-op 1 nor op determinism alone removed it), while with one inter-op thread
# they are bit-identical. The test that compares a resumed run with an uninterrupted one needs the
# same weights from the same seed (which also takes Grappler's memory optimizer off, as `train.run`
# does by default: README, Tests).
tf.config.threading.set_inter_op_parallelism_threads(1)

# Two logical CPU devices, so that tests can run two replicas (MirroredStrategy) on one CPU.
# This must happen before TensorFlow initialises its devices, i.e. before any test runs an op.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


def pytest_collection_modifyitems(config, items):
    """Drops tf.test.TestCase.test_session, a context manager pytest mistakes for a test."""
    items[:] = [item for item in items if item.name != "test_session"]
