"""Checkpointer: newest-readable restore with fallback, refusal of non-finite weights, checkpoints
found by their files when the state file misses them, leftovers of killed saves removed."""

import glob
import os

import numpy as np
import tensorflow as tf

from official_maskrcnn.training import checkpointing


class CheckpointerTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.create_tempdir().full_path
        self.weights = tf.Variable(np.zeros([64, 64], np.float32))
        self.step = tf.Variable(0, dtype=tf.int64)

    def checkpointer(self, **kwargs):
        return checkpointing.Checkpointer(self.dir, {"w": self.weights, "step": self.step},
                                          **kwargs)

    def save_steps(self, checkpointer, steps):
        for step in steps:
            self.weights.assign(np.full([64, 64], step, np.float32))
            self.step.assign(step)
            checkpointer.save(step, [self.weights])

    def test_fresh_directory_restores_nothing(self):
        self.assertIsNone(self.checkpointer().restore())

    def test_restores_the_newest(self):
        self.save_steps(self.checkpointer(), [10, 20])
        self.weights.assign(np.zeros([64, 64], np.float32))
        path = self.checkpointer().restore()
        self.assertTrue(path.endswith("ckpt-20"), path)
        self.assertEqual(int(self.step.numpy()), 20)
        self.assertAllEqual(self.weights, np.full([64, 64], 20.0))

    def test_keeps_only_the_newest_few(self):
        checkpointer = self.checkpointer(max_to_keep=2)
        self.save_steps(checkpointer, [1, 2, 3])
        self.assertEqual([os.path.basename(p) for p in checkpointer.manager.checkpoints],
                         ["ckpt-2", "ckpt-3"])
        self.assertEmpty(glob.glob(os.path.join(self.dir, "ckpt-1.*")))

    def test_damaged_newest_falls_back_to_the_previous_with_a_warning(self):
        self.save_steps(self.checkpointer(), [10, 20])
        data = glob.glob(os.path.join(self.dir, "ckpt-20.data-*"))[0]
        with open(data, "r+b") as f:
            f.truncate(100)  # a copy cut short
        with self.assertLogs(level="WARNING") as logs:
            path = self.checkpointer().restore()
        self.assertTrue(path.endswith("ckpt-10"), path)
        self.assertIn("ckpt-20", "\n".join(logs.output))
        self.assertEqual(int(self.step.numpy()), 10)
        self.assertAllEqual(self.weights, np.full([64, 64], 10.0))

    def test_missing_files_fall_back_too(self):
        self.save_steps(self.checkpointer(), [10, 20])
        os.remove(glob.glob(os.path.join(self.dir, "ckpt-20.index"))[0])
        path = self.checkpointer().restore()
        self.assertTrue(path.endswith("ckpt-10"), path)

    def test_no_readable_checkpoint_is_a_clear_error(self):
        self.save_steps(self.checkpointer(), [10])
        for path in glob.glob(os.path.join(self.dir, "ckpt-10.*")):
            with open(path, "wb") as f:
                f.write(b"garbage")
        with self.assertRaisesRegex(checkpointing.CheckpointError, "ckpt-10"):
            self.checkpointer().restore()

    def test_no_readable_checkpoint_is_one_line_naming_each(self):
        self.save_steps(self.checkpointer(), [10, 20])
        for path in glob.glob(os.path.join(self.dir, "ckpt-*.data-*")):
            with open(path, "r+b") as f:
                f.truncate(100)
        with self.assertRaises(checkpointing.CheckpointError) as raised:
            self.checkpointer().restore()
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(os.path.join(self.dir, "ckpt-20") + ": IndexError", message)
        self.assertIn(os.path.join(self.dir, "ckpt-10") + ": IndexError", message)

    def test_missing_state_file_resumes_from_the_newest_checkpoint_file(self):
        self.save_steps(self.checkpointer(), [10, 20])
        os.remove(os.path.join(self.dir, "checkpoint"))
        self.weights.assign(np.zeros([64, 64], np.float32))
        with self.assertLogs(level="WARNING") as logs:
            checkpointer = self.checkpointer()
        self.assertIn("state file is missing", "\n".join(logs.output))
        self.assertIn("ckpt-10, ckpt-20", "\n".join(logs.output))
        path = checkpointer.restore()
        self.assertTrue(path.endswith("ckpt-20"), path)
        self.assertEqual(int(self.step.numpy()), 20)
        self.assertAllEqual(self.weights, np.full([64, 64], 20.0))
        # The list is rebuilt: a fresh manager (e.g. evaluate) sees both.
        self.assertEqual([os.path.basename(p) for p in
                          tf.train.get_checkpoint_state(self.dir).all_model_checkpoint_paths],
                         ["ckpt-10", "ckpt-20"])

    def test_incomplete_state_file_lists_the_newer_checkpoint_files_too(self):
        # A crash after a checkpoint's files were renamed, before the state file was rewritten.
        checkpointer = self.checkpointer()
        self.save_steps(checkpointer, [10])
        with open(os.path.join(self.dir, "checkpoint")) as f:
            state_after_10 = f.read()
        self.save_steps(checkpointer, [20])
        with open(os.path.join(self.dir, "checkpoint"), "w") as f:
            f.write(state_after_10)
        with self.assertLogs(level="WARNING") as logs:
            path = self.checkpointer().restore()
        self.assertIn("state file is incomplete", "\n".join(logs.output))
        self.assertTrue(path.endswith("ckpt-20"), path)
        self.assertEqual(int(self.step.numpy()), 20)

    def test_rebuilt_list_keeps_max_to_keep_working(self):
        self.save_steps(self.checkpointer(max_to_keep=3), [1, 2, 3])
        os.remove(os.path.join(self.dir, "checkpoint"))
        checkpointer = self.checkpointer(max_to_keep=3)
        self.assertTrue(checkpointer.restore().endswith("ckpt-3"))
        self.save_steps(checkpointer, [4])
        self.assertEqual([os.path.basename(p) for p in checkpointer.manager.checkpoints],
                         ["ckpt-2", "ckpt-3", "ckpt-4"])
        self.assertEmpty(glob.glob(os.path.join(self.dir, "ckpt-1.*")))

    def test_leftovers_of_killed_saves_are_reported_and_removed(self):
        self.save_steps(self.checkpointer(), [10, 20])
        # What a save killed mid-write leaves (seen by killing one): TensorFlow's temporary
        # folder with a partial shard; also a data file whose index was never written and a
        # temporary copy of the state file.
        os.makedirs(os.path.join(self.dir, "ckpt-30_temp"))
        leftovers = [os.path.join(self.dir, "ckpt-30_temp",
                                  "part-00000-of-00001.data-00000-of-00001.tempstate123"),
                     os.path.join(self.dir, "ckpt-40.data-00000-of-00001"),
                     os.path.join(self.dir, "checkpoint.tmp0123abcd")]
        for path in leftovers:
            with open(path, "wb") as f:
                f.write(b"x" * 500_000)
        with self.assertLogs(level="WARNING") as logs:
            checkpointer = self.checkpointer()
        output = "\n".join(logs.output)
        self.assertIn("removing 3 leftover(s)", output)
        self.assertIn("(1.5 MB)", output)
        self.assertIn("ckpt-30_temp", output)
        self.assertEqual(sorted(os.listdir(self.dir)),
                         sorted(["checkpoint", "ckpt-10.index", "ckpt-10.data-00000-of-00001",
                                 "ckpt-20.index", "ckpt-20.data-00000-of-00001"]))
        self.assertTrue(checkpointer.restore().endswith("ckpt-20"))

    def test_checkpoint_of_another_model_is_not_silently_accepted(self):
        self.save_steps(self.checkpointer(), [10])
        other = tf.Variable(np.zeros([3], np.float32))
        mismatched = checkpointing.Checkpointer(self.dir, {"w": other, "step": self.step})
        with self.assertRaises(checkpointing.CheckpointError):
            mismatched.restore()

    def test_non_finite_weights_are_never_saved(self):
        checkpointer = self.checkpointer()
        self.save_steps(checkpointer, [10])
        self.weights.assign(np.full([64, 64], np.nan, np.float32))
        with self.assertRaisesRegex(checkpointing.NonFiniteWeightsError, "ckpt-10"):
            checkpointer.save(11, [self.weights])
        self.assertTrue(checkpointer.latest.endswith("ckpt-10"))
        self.assertEmpty(glob.glob(os.path.join(self.dir, "ckpt-11.*")))

    def test_non_chief_writes_nothing_into_the_model_dir(self):
        checkpointer = self.checkpointer(is_chief=False, worker_id=1)
        self.save_steps(checkpointer, [5])
        self.assertEqual(sorted(os.listdir(self.dir)), [])

    def test_non_chief_resumes_from_the_chiefs_checkpoints(self):
        # Every worker restores the same step: a non-chief restoring its (emptied) scratch
        # folder would start at step 0 beside a resumed chief.
        self.save_steps(self.checkpointer(), [10, 20])
        self.weights.assign(np.zeros([64, 64], np.float32))
        self.step.assign(0)
        path = self.checkpointer(is_chief=False, worker_id=1).restore()
        self.assertEqual(path, os.path.join(self.dir, "ckpt-20"))
        self.assertEqual(int(self.step.numpy()), 20)
        self.assertAllEqual(self.weights, np.full([64, 64], 20.0))


if __name__ == "__main__":
    tf.test.main()
