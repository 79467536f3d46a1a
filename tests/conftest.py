"""pytest setup shared by all tests."""

import tensorflow as tf
from absl import flags

# tf.test.TestCase helpers (create_tempdir, ...) read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

# Two logical CPU devices, so that tests can run two replicas (MirroredStrategy) on one CPU.
# This must happen before TensorFlow initialises its devices, i.e. before any test runs an op.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


def pytest_collection_modifyitems(config, items):
    """Drops tf.test.TestCase.test_session, a context manager pytest mistakes for a test."""
    items[:] = [item for item in items if item.name != "test_session"]
