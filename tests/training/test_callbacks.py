"""ScalarSummaries: the logs' scalars and the memory of each host call, read back."""

import os

import tensorflow as tf

from official_maskrcnn.training import callbacks as callbacks_lib
from tests import tensorboard_events


class ScalarSummariesTest(tf.test.TestCase):

    def test_each_host_calls_scalars_at_its_global_step(self):
        log_dir = os.path.join(self.create_tempdir().full_path, "train")
        summaries = callbacks_lib.ScalarSummaries(log_dir)
        summaries.on_train_begin()
        losses = {key: 0.5 + i for i, key in enumerate(callbacks_lib.LOSS_KEYS)}
        summaries.on_train_batch_end(1, dict(losses, step=2, learning_rate=0.01,
                                             images_per_second=3.0, loss_scale=32768.0,
                                             seconds=9.0))
        summaries.on_train_batch_end(3, dict(losses, step=4, learning_rate=0.02))
        summaries.on_train_end()
        scalars = tensorboard_events.scalars(log_dir)
        for key, value in losses.items():
            self.assertEqual(scalars[key], [(2, value), (4, value)])
        self.assertEqual(scalars["learning_rate"], [(2, tf.constant(0.01).numpy()),
                                                    (4, tf.constant(0.02).numpy())])
        self.assertEqual(scalars["loss_scale"], [(2, 32768.0)])  # only where the logs have it
        self.assertEqual(scalars["images_per_second"], [(2, 3.0)])
        self.assertNotIn("seconds", scalars)
        # This machine has no GPU: the process's RSS, at every call.
        self.assertEqual([step for step, _ in scalars["memory/rss_mib"]], [2, 4])
        self.assertTrue(all(mib > 100 for _, mib in scalars["memory/rss_mib"]))
        self.assertEqual([step for step, _ in scalars["memory/peak_rss_mib"]], [2, 4])


if __name__ == "__main__":
    tf.test.main()
