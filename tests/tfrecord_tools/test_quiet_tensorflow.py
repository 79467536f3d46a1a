"""quiet_tensorflow's parts in this process; the entries' console end to end is checked on the
stderr of real smoke runs in tests/training/test_train.py (ConcurrentRunTest, MultiWorkerTest).
"""

import logging
import os
import sys
import tempfile
import types
from unittest import mock

import tensorflow as tf
from absl import app, flags
from absl import logging as absl_logging

from tfrecord_tools import quiet_tensorflow


def fd2_output(fn):
    """Runs `fn` with file descriptor 2 (and sys.stderr) going to a file; returns its text."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            fn()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return f.read().decode()


def main_module(spec_name):
    module = types.ModuleType("__main__")
    module.__spec__ = None if spec_name is None else mock.Mock()
    if spec_name is not None:
        module.__spec__.name = spec_name
    return module


class QuietTensorflowTest(tf.test.TestCase):

    def test_only_a_process_started_as_one_of_our_modules_counts_as_an_entry(self):
        for name, expected in [("official_maskrcnn.train", True),
                               ("tfrecord_tools.verify_tfrecord", True),
                               ("pytest", False), ("official_maskrcnn_fork.train", False),
                               (None, False)]:  # a script or `python -c`: no spec
            with mock.patch.dict(sys.modules, {"__main__": main_module(name)}):
                self.assertEqual(quiet_tensorflow.started_as_entry(), expected, name)
        # This very process (pytest) is not one: importing the module changed nothing.
        self.assertFalse(quiet_tensorflow.started_as_entry())

    def test_the_dropped_line_is_gone_and_the_rest_passes_in_order(self):
        cuinit = (b"2026-12-03 13:35:10.129253: E external/local_xla/xla/stream_executor/cuda/"
                  b"cuda_platform.cc:51] failed call to cuInit: INTERNAL: CUDA error: Failed "
                  b"call to cuInit: UNKNOWN ERROR (303)\n")

        def write():
            with quiet_tensorflow.lines_dropped(quiet_tensorflow.NO_DRIVER_CUINIT):
                os.write(2, b"C++ before\n" + cuinit)
                # As Python's own sys.stderr of an entry (pytest replaces sys.stderr here).
                with open(2, "w", closefd=False) as python_stderr:
                    print("python between", file=python_stderr)
                os.write(2, b"C++ after, no newline")

        self.assertEqual(fd2_output(write), "C++ before\npython between\nC++ after, no newline")

    def test_what_was_held_back_is_passed_on_when_the_block_raises(self):
        def fail():
            with quiet_tensorflow.lines_dropped(quiet_tensorflow.NO_DRIVER_CUINIT):
                os.write(2, b"a real problem\n")
                raise ImportError("broken install")

        def run():
            with self.assertRaises(ImportError):
                fail()

        self.assertEqual(fd2_output(run), "a real problem\n")

    def test_the_absl_level_silences_tensorflows_absl_warnings(self):
        # tf.data warns through absl (not TensorFlow's own logger) when slack is asked for and
        # the pipeline does not end in a prefetch: TF_CPP_MIN_LOG_LEVEL does not reach it.
        def slack_warning():
            options = tf.data.Options()
            options.experimental_slack = True
            dataset = tf.data.Dataset.range(3).map(lambda x: x + 1).with_options(options)
            self.assertEqual(list(dataset.as_numpy_iterator()), [1, 2, 3])

        self.assertIn("slack", fd2_output(slack_warning))  # absl's default: warnings shown
        self.assertTrue(quiet_tensorflow.set_absl_min_log_level(2))
        try:
            self.assertNotIn("slack", fd2_output(slack_warning))
        finally:
            self.assertTrue(quiet_tensorflow.set_absl_min_log_level(0))  # absl's default
        self.assertIn("slack", fd2_output(slack_warning))

    def test_info_from_the_libraries_is_dropped_and_the_rest_kept(self):
        library = os.path.dirname(tf.__file__)
        quiet = quiet_tensorflow.DropInfoFrom([library])

        def record(level, pathname):
            return logging.LogRecord("absl", level, pathname, 1, "message", (), None)

        inside = os.path.join(library, "python", "checkpoint", "functional_saver.py")
        self.assertFalse(quiet.filter(record(logging.INFO, inside)))
        self.assertTrue(quiet.filter(record(logging.WARNING, inside)))
        self.assertTrue(quiet.filter(record(logging.INFO, "/work/official_maskrcnn/train.py")))
        # A sibling folder whose name starts with the library's is not the library.
        self.assertTrue(quiet.filter(record(logging.INFO, library + "_addons/x.py")))

    def test_python_logging_is_quieted_after_the_flags_unless_verbosity_was_given(self):
        tf_logger, absl_logger = logging.getLogger("tensorflow"), absl_logging.get_absl_logger()
        level, filters = tf_logger.level, list(absl_logger.filters)
        self.addCleanup(tf_logger.setLevel, level)
        self.addCleanup(setattr, absl_logger, "filters", filters)
        verbosity = flags.FLAGS["verbosity"]
        for given, expected_level in [(1, level), (0, logging.WARNING)]:
            with mock.patch.object(verbosity, "present", given), \
                    mock.patch.object(app, "call_after_init", lambda callback: callback()):
                quiet_tensorflow.quiet_python_logging_unless_verbosity_given()
            self.assertEqual(tf_logger.level, expected_level, f"--verbosity given: {given}")
            added = [f for f in absl_logger.filters if f not in filters]
            self.assertLen(added, 0 if given else 1)
        self.assertEqual(added[0].directories[0], os.path.join(os.path.dirname(tf.__file__), ""))


if __name__ == "__main__":
    tf.test.main()
