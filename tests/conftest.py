"""pytest setup shared by all tests."""

from absl import flags

# tf.test.TestCase helpers (create_tempdir, ...) read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
    """Drops tf.test.TestCase.test_session, a context manager pytest mistakes for a test."""
    items[:] = [item for item in items if item.name != "test_session"]
