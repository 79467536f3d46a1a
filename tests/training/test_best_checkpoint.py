"""best/: a fake sequence of evaluation metrics over real checkpoints of a one-variable model,
pruned by max_checkpoints; ties, NaN, resume, a kill mid-swap; the eval callback driving it."""

import json
import math
import os

import numpy as np
import tensorflow as tf

from official_maskrcnn import runtime
from official_maskrcnn.evaluation import coco_eval_callback
from official_maskrcnn.training import best_checkpoint, checkpointing
from tests.evaluation.test_coco_eval_callback import FakeEvaluator, FakePostProcessor, metrics


class BestCheckpointTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.model_dir = self.create_tempdir().full_path
        self.weight = tf.Variable(0.0)
        self.checkpointer = checkpointing.Checkpointer(self.model_dir, {"weight": self.weight},
                                                       max_to_keep=2)

    def save(self, step):
        """Checkpoint `step` of the model dir, holding the weight value `step`."""
        self.weight.assign(float(step))
        return self.checkpointer.save(step, [self.weight])

    def weight_in(self, checkpoint):
        weight = tf.Variable(-1.0)
        tf.train.Checkpoint(weight=weight).restore(checkpoint).assert_existing_objects_matched()
        return float(weight.numpy())

    def evaluate(self, keeper, epoch_num, step, box, mask):
        """An evaluation of checkpoint `step` (saved now) with these APs; returns offer's bool."""
        self.save(step)
        return keeper.offer(keeper.reserve(step), epoch_num, metrics(box, mask))

    def test_highest_box_then_mask_ap_never_nan_never_pruned(self):
        keeper = best_checkpoint.BestCheckpoint(self.model_dir, run_id="r1")
        sequence = [  # (epoch, step, box AP, mask AP, becomes best)
            (1, 2, 0.10, 0.10, True),
            (2, 4, 0.30, 0.20, True),
            (3, 6, math.nan, 0.50, False),   # NaN: never best
            (4, 8, 0.30, 0.25, True),        # equal box AP, higher mask AP
            (5, 10, 0.30, 0.25, False),      # a tie on both keeps the earlier
            (6, 12, 0.25, 0.90, False),      # box AP decides first
        ]
        for epoch, step, box, mask, becomes_best in sequence:
            self.assertEqual(self.evaluate(keeper, epoch, step, box, mask), becomes_best, epoch)
        best_dir = os.path.join(self.model_dir, "best")
        # max_checkpoints = 2 pruned ckpt-8 from the model dir; best/ still has it.
        self.assertFalse(os.path.exists(os.path.join(self.model_dir, "ckpt-8.index")))
        self.assertEqual(sorted(os.listdir(best_dir)),
                         ["checkpoint", "ckpt-8.data-00000-of-00001", "ckpt-8.index",
                          "metrics.json"])
        self.assertEqual(self.weight_in(os.path.join(best_dir, "ckpt-8")), 8.0)
        # The entries' --checkpoint takes the folder.
        self.assertEqual(runtime.resolve_checkpoint(best_dir), os.path.join(best_dir, "ckpt-8"))
        with open(os.path.join(best_dir, "metrics.json")) as f:
            record = json.load(f)
        self.assertEqual((record["epoch"], record["step"], record["run_id"]), (4, 8, "r1"))
        self.assertEqual((record["bbox"]["AP"], record["segm"]["AP"]), (0.30, 0.25))
        self.assertEqual(record["source"], os.path.join(self.model_dir, "ckpt-8"))
        # Nothing left behind but best/ and the model dir's own files.
        self.assertEqual([n for n in os.listdir(self.model_dir) if n.startswith(".best")], [])

        # Resume: a new keeper reads the earlier best back and only a better one replaces it.
        resumed = best_checkpoint.BestCheckpoint(self.model_dir, run_id="r2")
        self.assertEqual(resumed.best["step"], 8)
        self.assertFalse(self.evaluate(resumed, 7, 14, 0.29, 0.99))
        self.assertTrue(self.evaluate(resumed, 8, 16, 0.31, 0.0))
        self.assertEqual(self.weight_in(os.path.join(best_dir, "ckpt-16")), 16.0)
        self.assertEqual(sorted(os.listdir(best_dir)),
                         ["checkpoint", "ckpt-16.data-00000-of-00001", "ckpt-16.index",
                          "metrics.json"])

    def test_a_checkpoint_pruned_before_its_result_arrives_is_still_kept(self):
        keeper = best_checkpoint.BestCheckpoint(self.model_dir)
        self.save(2)
        reservation = keeper.reserve(2)  # asynchronous: the result comes later
        self.save(4)
        self.save(6)  # max_checkpoints = 2: ckpt-2 is pruned
        self.assertFalse(os.path.exists(os.path.join(self.model_dir, "ckpt-2.index")))
        self.assertTrue(keeper.offer(reservation, 1, metrics(0.2, 0.1)))
        self.assertEqual(self.weight_in(os.path.join(self.model_dir, "best", "ckpt-2")), 2.0)

    def test_a_nan_first_evaluation_and_a_missing_checkpoint_are_not_best(self):
        keeper = best_checkpoint.BestCheckpoint(self.model_dir)
        self.assertFalse(self.evaluate(keeper, 1, 2, 0.5, math.nan))
        self.assertIsNone(keeper.reserve(99))
        self.assertFalse(keeper.offer(None, 2, metrics(0.9, 0.9)))
        self.assertIsNone(keeper.best)
        self.assertFalse(os.path.exists(os.path.join(self.model_dir, "best")))

    def test_what_a_kill_mid_swap_leaves_is_put_right(self):
        keeper = best_checkpoint.BestCheckpoint(self.model_dir)
        self.evaluate(keeper, 1, 2, 0.2, 0.2)
        # Killed between the two renames of the next swap: best/ moved away, and a pending one.
        best_dir = os.path.join(self.model_dir, "best")
        os.rename(best_dir, os.path.join(self.model_dir, ".best-replaced-4"))
        self.save(4)
        keeper.reserve(4)
        recovered = best_checkpoint.BestCheckpoint(self.model_dir)
        self.assertEqual(recovered.best["step"], 2)
        self.assertEqual(self.weight_in(os.path.join(best_dir, "ckpt-2")), 2.0)
        self.assertEqual([n for n in os.listdir(self.model_dir) if n.startswith(".best")], [])

    def test_unreadable_metrics_are_an_error_naming_the_file(self):
        best_dir = os.path.join(self.model_dir, "best")
        os.makedirs(best_dir)
        path = os.path.join(best_dir, "metrics.json")
        for content in ['{"epoch": 1, "bbox"', '{"bbox": {"AP": 0.1}}']:
            with open(path, "w") as f:
                f.write(content)
            with self.assertRaisesRegex(best_checkpoint.BestCheckpointError,
                                        f"^{path}: cannot read the best checkpoint's metrics"):
                best_checkpoint.BestCheckpoint(self.model_dir)
        # An error every entry reports in one line (exit code 1).
        self.assertTrue(issubclass(best_checkpoint.BestCheckpointError, runtime.INPUT_ERRORS))

    def test_the_eval_callback_offers_each_result_with_the_checkpoint_it_evaluated(self):
        keeper = best_checkpoint.BestCheckpoint(self.model_dir)
        postprocessor = FakePostProcessor([(0.2, 0.2), (0.1, 0.1), (0.3, 0.1)], complete=False)
        callback = coco_eval_callback.COCOEvalCallback(FakeEvaluator(), postprocessor,
                                                       asynchronous=True, best=keeper)
        self.save(3)  # epoch 1 ends at step 3: its checkpoint, then its evaluation
        callback.on_train_batch_end(2, {"step": 3})
        callback.on_epoch_end(0)
        self.save(6)
        callback.on_train_batch_end(5, {"step": 6})
        callback.on_epoch_end(1)
        self.save(9)  # ckpt-3 pruned while its evaluation is still pending
        postprocessor.finish(0)
        postprocessor.finish(1)
        callback.on_train_batch_end(8, {"step": 9})
        self.assertEqual(keeper.best["step"], 3)
        self.assertEqual(self.weight_in(os.path.join(self.model_dir, "best", "ckpt-3")), 3.0)
        # A redone evaluation (resume) names its epoch's checkpoint, not the step now.
        callback.evaluate(3, step=9, checkpoint_step=6)
        postprocessor.finish(2)
        callback.on_train_end()
        self.assertEqual((keeper.best["epoch"], keeper.best["step"]), (3, 6))
        self.assertAllEqual(self.weight_in(os.path.join(self.model_dir, "best", "ckpt-6")),
                            np.float32(6.0))


if __name__ == "__main__":
    tf.test.main()
