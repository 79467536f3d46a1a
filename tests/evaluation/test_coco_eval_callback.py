"""COCOEvalCallback: when it evaluates, what it logs, when it stops; sync and async."""

import concurrent.futures
import functools
import json
import os
import threading

import tensorflow as tf
import tf_keras

from official_maskrcnn.evaluation import coco_eval_callback, coco_metrics
from official_maskrcnn.training import mlperf_logger


def metrics(box, mask):
    return {"bbox": dict.fromkeys(coco_metrics.STAT_NAMES, 0.0) | {"AP": box},
            "segm": dict.fromkeys(coco_metrics.STAT_NAMES, 0.0) | {"AP": mask}}


class FakeEvaluator:
    def __init__(self):
        self.calls = 0

    def predict(self):
        self.calls += 1
        return {"source_id": [self.calls]}


class FakePostProcessor:
    """Hands out futures the test completes with the APs of `results` (one per evaluation)."""

    def __init__(self, results, complete=True):
        self.results = list(results)
        self.complete = complete
        self.futures = []

    def submit(self, outputs):
        future = concurrent.futures.Future()
        if self.complete:
            future.set_result((metrics(*self.results[len(self.futures)]), []))
        self.futures.append(future)
        return future

    def finish(self, index):
        self.futures[index].set_result((metrics(*self.results[index]), []))


class RecordingSummaries:
    """Records the callback's calls of `eval_summaries.EvalSummaries`' methods."""

    def __init__(self):
        self.calls = []

    def draw(self, outputs):
        self.calls.append(("draw", list(outputs["source_id"])))
        return {"pictures of": list(outputs["source_id"])}

    def write(self, step, metrics, pictures):
        self.calls.append(("write", step, metrics["bbox"]["AP"], pictures))

    def close(self):
        self.calls.append(("close",))


class CallbackTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.create_tempdir().full_path
        self.model = tf_keras.Sequential([tf_keras.layers.Dense(1)])
        self.model.stop_training = False

    def callback(self, postprocessor, **kwargs):
        self.log_path = os.path.join(self.dir, "mlperf.log")
        self.mllog = mlperf_logger.MLPerfLogger(self.log_path)
        callback = coco_eval_callback.COCOEvalCallback(
            FakeEvaluator(), postprocessor, mlperf=self.mllog,
            metrics_path=os.path.join(self.dir, "metrics.jsonl"), **kwargs)
        callback.set_model(self.model)
        return callback

    def logged(self, key):
        self.mllog.close()
        with open(self.log_path) as f:
            events = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in f]
        return [(e["metadata"].get("epoch_num"), e["value"]) for e in events if e["key"] == key]

    def metrics_lines(self):
        with open(os.path.join(self.dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    def test_sync_stops_when_both_targets_are_met_and_not_before(self):
        callback = self.callback(FakePostProcessor([(0.38, 0.30), (0.36, 0.35), (0.377, 0.339)]))
        for epoch in range(3):
            self.assertFalse(self.model.stop_training)
            callback.on_epoch_end(epoch)
        self.assertTrue(self.model.stop_training)
        self.assertTrue(callback.targets_met)
        self.assertEqual(self.logged("eval_accuracy"),
                         [(1, {"BBOX": 0.38, "SEGM": 0.30}), (2, {"BBOX": 0.36, "SEGM": 0.35}),
                          (3, {"BBOX": 0.377, "SEGM": 0.339})])
        self.assertEqual([e for e, _ in self.logged("eval_start")], [1, 2, 3])
        self.assertEqual([line["targets_met"] for line in self.metrics_lines()],
                         [False, False, True])

    def test_custom_targets_and_interval(self):
        callback = self.callback(FakePostProcessor([(0.2, 0.2), (0.5, 0.5)]), interval=2,
                                 box_target=0.5, mask_target=0.5)
        for epoch in range(4):
            callback.on_epoch_end(epoch)
        self.assertEqual([line["epoch"] for line in self.metrics_lines()], [2, 4])
        self.assertTrue(self.model.stop_training)
        with self.assertRaisesRegex(ValueError, "interval"):
            self.callback(FakePostProcessor([]), interval=0)

    def test_no_evaluation_of_an_epoch_cut_short(self):
        callback = self.callback(FakePostProcessor([(0.5, 0.5)]))
        self.model.stop_training = True
        callback.on_epoch_end(0)
        self.assertEqual(callback.evaluator.calls, 0)

    def test_async_logs_results_later_with_their_epoch_and_stops_at_the_next_boundary(self):
        post = FakePostProcessor([(0.1, 0.1), (0.4, 0.4)], complete=False)
        callback = self.callback(post, asynchronous=True)
        callback.on_epoch_end(0)
        callback.on_train_batch_end(10, {"step": 11})
        self.assertEqual(self.metrics_lines() if os.path.exists(
            os.path.join(self.dir, "metrics.jsonl")) else [], [])  # not ready: nothing yet
        callback.on_epoch_end(1)
        post.finish(1)  # the second finishes first: still logged in epoch order
        callback.on_train_batch_end(12, {"step": 13})
        self.assertFalse(os.path.exists(os.path.join(self.dir, "metrics.jsonl")))
        post.finish(0)
        callback.on_train_batch_end(14, {"step": 15})
        self.assertTrue(self.model.stop_training)
        lines = self.metrics_lines()
        self.assertEqual([(line["epoch"], line["step_logged"]) for line in lines],
                         [(1, 15), (2, 15)])
        self.assertEqual([e for e, _ in self.logged("eval_stop")], [1, 2])

    def test_summaries_are_written_at_the_evaluated_checkpoints_step_when_logged(self):
        post = FakePostProcessor([(0.1, 0.1), (0.2, 0.2)], complete=False)
        summaries = RecordingSummaries()
        callback = self.callback(post, asynchronous=True, summaries=summaries)
        # Resumed at step 12: epoch 1's lost evaluation, with its step-8 checkpoint's weights.
        callback.evaluate(1, step=12, checkpoint_step=8)
        self.assertEqual(summaries.calls, [("draw", [1])])  # drawn at once, written later
        callback.on_train_batch_end(13, {"step": 14})
        post.finish(0)
        callback.on_train_batch_end(15, {"step": 16})
        callback.on_epoch_end(1)  # epoch 2 ends at step 16: its checkpoint's step
        callback.on_train_batch_end(17, {"step": 18})
        post.finish(1)
        callback.on_train_end()
        self.assertEqual(summaries.calls[1:],
                         [("write", 8, 0.1, {"pictures of": [1]}), ("draw", [2]),
                          ("write", 16, 0.2, {"pictures of": [2]}), ("close",)])
        # metrics.jsonl says when each was logged, TensorBoard which weights it scored.
        self.assertEqual([line["step_logged"] for line in self.metrics_lines()], [16, 18])

    def test_async_pending_evaluations_are_awaited_at_the_end(self):
        post = FakePostProcessor([(0.1, 0.1)], complete=False)
        callback = self.callback(post, asynchronous=True)
        callback.on_epoch_end(0)
        threading.Timer(0.2, post.finish, args=(0,)).start()
        callback.on_train_end()
        self.assertEqual([line["epoch"] for line in self.metrics_lines()], [1])

    def test_each_line_carries_the_run_id(self):
        callback = self.callback(FakePostProcessor([(0.1, 0.1)]), run_id="ab" * 16)
        callback.on_epoch_end(0)
        self.assertEqual([line["run_id"] for line in self.metrics_lines()], ["ab" * 16])

    def test_earlier_results_count_toward_the_target_and_stop_at_once(self):
        callback = self.callback(FakePostProcessor([]))
        callback.add_earlier_results({1: metrics(0.1, 0.1)})
        callback.on_train_begin()
        self.assertFalse(self.model.stop_training)  # not met: train on
        self.assertFalse(callback.targets_met)
        callback.add_earlier_results({2: metrics(0.4, 0.4)})
        callback.on_train_begin()
        self.assertTrue(self.model.stop_training)  # met before the kill: no more training
        self.assertTrue(callback.targets_met)
        self.assertEqual(callback.evaluator.calls, 0)


class EarlierResultsTest(tf.test.TestCase):
    """Which epochs of a resumed run have no evaluation result (`metrics.jsonl`)."""

    def test_complete_lines_count_and_a_torn_last_line_does_not(self):
        path = os.path.join(self.create_tempdir().full_path, "metrics.jsonl")
        self.assertEqual(coco_eval_callback.read_results(path), {})  # a fresh run: no file
        with open(path, "w") as f:
            for epoch in (1, 2):
                f.write(json.dumps({"epoch": epoch, **metrics(0.1 * epoch, 0.1)}) + "\n")
            f.write('{"epoch": 3, "bbox": {"AP": 0.')  # killed mid-write
        with self.assertLogs(level="WARNING") as logs:
            results = coco_eval_callback.read_results(path)
        self.assertEqual(sorted(results), [1, 2])
        self.assertEqual(results[2]["bbox"]["AP"], 0.2)
        self.assertIn("line 3", "\n".join(logs.output))

    def test_a_line_appended_after_a_torn_one_starts_on_its_own_line(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "metrics.jsonl")
        with open(path, "w") as f:
            f.write('{"epoch": 1, "bb')  # killed mid-write
        callback = coco_eval_callback.COCOEvalCallback(
            FakeEvaluator(), FakePostProcessor([(0.3, 0.3)]), metrics_path=path)
        callback.evaluate(1)
        with self.assertLogs(level="WARNING"):
            results = coco_eval_callback.read_results(path)
        self.assertEqual(list(results), [1])
        self.assertEqual(results[1]["bbox"]["AP"], 0.3)

    def test_the_epoch_end_checkpoints_after_the_newest_result_lack_one(self):
        lost = functools.partial(coco_eval_callback.evaluations_to_redo, steps_per_epoch=8,
                                 total_steps=36)
        done = {1: metrics(0.1, 0.1)}
        # Sync, killed in epoch 2's evaluation: the restored checkpoint is epoch 2's end.
        self.assertEqual(lost([8, 16], done), [(2, 16)])
        # Async, killed while epochs 2 and 3 were post-processed, resumed from a periodic
        # checkpoint inside epoch 4: both, oldest first, each with its own epoch-end weights.
        self.assertEqual(lost([8, 16, 20, 24, 28], done), [(2, 16), (3, 24)])
        # Mid-epoch checkpoints and epochs already evaluated need nothing.
        self.assertEqual(lost([8, 12], done), [])
        self.assertEqual(lost([8], done), [])
        # The last epoch cut by max_steps (36 = 4.5 epochs) is epoch 5, as the run numbers it.
        self.assertEqual(lost([32, 36], {4: metrics(0.1, 0.1)}), [(5, 36)])
        # Only epochs the interval evaluates; none before the newest result (runs that had
        # evaluation off are not evaluated after the fact).
        self.assertEqual(lost([8, 16, 24, 32], {}, interval=2), [(2, 16), (4, 32)])
        self.assertEqual(lost([8, 16, 24], {2: metrics(0.1, 0.1)}), [(3, 24)])
        self.assertEqual(lost([], {}), [])


if __name__ == "__main__":
    tf.test.main()
