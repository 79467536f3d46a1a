"""pytest setup shared by all tests."""

from absl import flags

# tf.test.TestCase helpers (create_tempdir, ...) read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
