"""Tests for official_maskrcnn.training.mlperf_logger and the run/download shell scripts.

The oracle for the log is the real MLPerf compliance checker (ruleset 3.1.0) run in a subprocess;
each run costs about half a second, so only four logs are checked with it. Parsing of the
checker's output is also tested on a hand-written sample, without a subprocess.
"""

import contextlib
import io
import json
import os
import subprocess

import tensorflow as tf

from official_maskrcnn.training.mlperf_compliance import check_compliance
from official_maskrcnn.training.mlperf_logger import MLPerfLogger

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_AND_TIME = os.path.join(REPO_ROOT, "run_and_time.sh")
DOWNLOAD_DATASET = os.path.join(REPO_ROOT, "download_dataset.sh")

# The closed-division targets of the 3.1.0 rules (closed_maskrcnn.yaml).
TARGET_BBOX, TARGET_SEGM = 0.377, 0.339
EVAL_KEYS = frozenset({"eval_start", "eval_stop", "eval_accuracy"})


def _read_lines(path):
    """The JSON of each `:::MLLOG` line of `path`, in order."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert all(line.startswith(":::MLLOG {") for line in lines), lines
    return [json.loads(line[len(":::MLLOG "):]) for line in lines]


def _write_run(path, with_eval=True, final_accuracy=(TARGET_BBOX, TARGET_SEGM), run_id=None):
    """Logs a simulated 2-epoch run; epoch 1 evaluates below target, epoch 2 at final_accuracy."""
    with MLPerfLogger(path, run_id=run_id) as mllogger:
        mllogger.submission_info(org="test", division="closed", platform="2xCPU",
                                 status="research")
        mllogger.cache_clear()
        mllogger.init_start()
        mllogger.hyperparameters(
            global_batch_size=16, train_samples=117266, eval_samples=5000,
            base_learning_rate=0.02, warmup_steps=500, warmup_factor=1.0 / 3,
            decay_steps=(60000, 80000), decay_factor=0.1, num_image_candidates=1000,
            min_image_size=800, max_image_size=1333, seed=7)
        mllogger.init_stop()
        mllogger.run_start()
        accuracies = {1: (0.2, 0.18), 2: final_accuracy}
        for epoch in (1, 2):
            mllogger.epoch_start(epoch)
            mllogger.epoch_stop(epoch)
            if with_eval:
                mllogger.eval_start(epoch)
                mllogger.eval_stop(epoch)
                mllogger.eval_accuracy(epoch, *accuracies[epoch])
        mllogger.run_stop(success=with_eval)


class MLPerfLoggerComplianceTest(tf.test.TestCase):
    """Logs written by MLPerfLogger, judged by the real 3.1.0 checker."""

    def test_complete_run_at_target_passes_every_check(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        _write_run(path)

        result = check_compliance(path)

        self.assertTrue(result.passed, result.output)
        self.assertEqual(result.failures, ())
        self.assertEqual(result.warnings, ())
        # The lines themselves: what the rules read besides presence.
        lines = {line["key"]: line for line in _read_lines(path)}
        self.assertEqual(lines["submission_benchmark"]["value"], "maskrcnn")
        self.assertEqual(lines["opt_learning_rate_decay_steps"]["value"], [60000, 80000])
        self.assertEqual(lines["run_stop"]["metadata"]["status"], "success")
        self.assertEqual(lines["eval_accuracy"]["value"], {"BBOX": 0.377, "SEGM": 0.339})
        self.assertEqual(lines["eval_accuracy"]["metadata"]["epoch_num"], 2)
        self.assertEqual(lines["epoch_stop"]["metadata"]["epoch_num"], 2)
        self.assertEqual(lines["init_start"]["event_type"], "INTERVAL_START")
        self.assertEqual(lines["init_stop"]["event_type"], "INTERVAL_END")
        # mllog's call-site metadata names the caller of MLPerfLogger, not the logger module.
        self.assertEqual(lines["eval_accuracy"]["metadata"]["file"], os.path.abspath(__file__))

    def test_run_id_in_every_line_passes_every_check(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        _write_run(path, run_id="0123abcd")

        result = check_compliance(path)

        self.assertTrue(result.passed, result.output)
        self.assertEqual((result.failures, result.warnings), ((), ()))
        lines = _read_lines(path)
        self.assertEqual({line["metadata"]["run_id"] for line in lines}, {"0123abcd"})
        by_key = {line["key"]: line for line in lines}
        self.assertEqual(by_key["run_stop"]["metadata"]["status"], "success")  # kept beside it

    def test_run_without_eval_fails_only_on_eval_keys(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        _write_run(path, with_eval=False)

        result = check_compliance(path)

        self.assertFalse(result.passed)
        # eval_start/eval_stop are required "or block_start/block_stop", so those are named too.
        self.assertEqual(result.failed_keys,
                         EVAL_KEYS | {"block_start", "block_stop"})
        self.assertEqual(result.failures_excluding(EVAL_KEYS), [])
        self.assertNotEqual(result.failures_excluding({"eval_accuracy"}), [])

    def test_accuracy_below_target_fails_on_eval_accuracy_only(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        # Mask at target, box one step below it: the box condition alone must fail the run.
        _write_run(path, final_accuracy=(0.3769, TARGET_SEGM))

        result = check_compliance(path)

        self.assertFalse(result.passed)
        self.assertLen(result.failures, 1)
        self.assertEqual(result.failures[0].keys, {"eval_accuracy"})
        self.assertIn("0.377", result.failures[0].text)
        self.assertEqual(result.failures_excluding({"eval_accuracy"}), [])

    def test_line_check_failure_names_its_key(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        _write_run(path)
        with MLPerfLogger(path) as mllogger:
            # An epoch_start without epoch_num, written through the generic writer.
            mllogger.event("epoch_start", metadata={"step": 3})

        result = check_compliance(path)

        self.assertFalse(result.passed)
        self.assertLen(result.failures, 1)
        self.assertEqual(result.failures[0].keys, {"epoch_start"})
        self.assertIn("'epoch_num' in v['metadata']", result.failures[0].text)


class MLPerfLoggerFileTest(tf.test.TestCase):
    """Where and how lines are written."""

    def test_disabled_logger_writes_nothing(self):
        folder = os.path.join(self.create_tempdir().full_path, "model_dir")
        path = os.path.join(folder, "mlperf.log")
        with MLPerfLogger(path, enabled=False) as mllogger:
            mllogger.submission_info("org", "closed", "p", "onprem")
            mllogger.init_start()
            mllogger.event("anything", 1)
            mllogger.eval_accuracy(1, 0.5, 0.5)
            mllogger.run_stop(success=True)
        self.assertFalse(os.path.exists(folder))

    def test_two_loggers_in_one_process_write_to_their_own_files(self):
        folder = self.create_tempdir().full_path
        path_a, path_b = os.path.join(folder, "a.log"), os.path.join(folder, "b.log")
        logger_a, logger_b = MLPerfLogger(path_a), MLPerfLogger(path_b)
        logger_a.event("from_a", 1)
        logger_b.event("from_b", 2)
        logger_a.epoch_start(1)
        logger_a.close()
        logger_b.close()
        self.assertEqual([(line["key"], line["value"]) for line in _read_lines(path_a)],
                         [("from_a", 1), ("epoch_start", None)])
        self.assertEqual([(line["key"], line["value"]) for line in _read_lines(path_b)],
                         [("from_b", 2)])

    def test_reopening_appends(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        with MLPerfLogger(path) as mllogger:
            mllogger.init_start()
            mllogger.init_stop()
        with MLPerfLogger(path) as mllogger:
            mllogger.init_start()
        self.assertEqual([line["key"] for line in _read_lines(path)],
                         ["init_start", "init_stop", "init_start"])

    def test_lines_reach_the_file_before_close(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        mllogger = MLPerfLogger(path)
        mllogger.run_start()
        # A crash now must not lose the line: it is already on disk.
        self.assertEqual([line["key"] for line in _read_lines(path)], ["run_start"])
        mllogger.close()
        mllogger.run_stop(success=False)  # After close: a no-op, not an error.
        self.assertLen(_read_lines(path), 1)

    def test_stdout_copy(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            with MLPerfLogger(path, stdout=True) as mllogger:
                mllogger.cache_clear()
        with open(path, encoding="utf-8") as f:
            self.assertEqual(captured.getvalue(), f.read())
        self.assertIn('"key": "cache_clear"', captured.getvalue())

    def test_bad_arguments_fail_before_writing(self):
        path = os.path.join(self.create_tempdir().full_path, "mlperf.log")
        with MLPerfLogger(path) as mllogger:
            with self.assertRaisesRegex(ValueError, "submission_division.*'closd'"):
                mllogger.submission_info("org", "closd", "p", "onprem")
            with self.assertRaisesRegex(ValueError, "two steps.*60000, 70000, 80000"):
                mllogger.hyperparameters(16, 1, 1, 0.02, 500, 0.3, (60000, 70000, 80000), 0.1,
                                         1000, 800, 1333, 1)
            with self.assertRaisesRegex(TypeError, "metadata must be a mapping"):
                mllogger.event("x", 1, metadata=[1])
        self.assertEqual(_read_lines(path), [])


class ShellScriptTest(tf.test.TestCase):
    """run_and_time.sh and download_dataset.sh (nothing is downloaded or trained)."""

    def _run_and_time(self, env_updates, unset=(), args=()):
        env = {k: v for k, v in os.environ.items() if k not in unset}
        env.update(env_updates)
        return subprocess.run(["bash", RUN_AND_TIME, *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    def test_scripts_are_valid_bash(self):
        for script in (RUN_AND_TIME, DOWNLOAD_DATASET):
            completed = subprocess.run(["bash", "-n", script], capture_output=True, text=True,
                                       check=False)
            self.assertEqual(completed.returncode, 0, completed.stderr)

    def test_missing_data_dir_is_a_clear_error(self):
        completed = self._run_and_time({"MODEL_DIR": self.create_tempdir().full_path},
                                       unset=("DATA_DIR",))
        self.assertNotEqual(completed.returncode, 0)
        self.assertIn("DATA_DIR is not set", completed.stderr)
        self.assertNotIn("STARTING TIMING RUN", completed.stdout)

    def test_missing_model_dir_is_a_clear_error(self):
        completed = self._run_and_time({"DATA_DIR": self.create_tempdir().full_path},
                                       unset=("MODEL_DIR",))
        self.assertNotEqual(completed.returncode, 0)
        self.assertIn("MODEL_DIR is not set", completed.stderr)

    def test_training_command_result_line_and_exit_code(self):
        """A stand-in interpreter records its arguments and fails with 3; the script must pass
        the documented flags, print the timing lines and exit with 3."""
        tmp = self.create_tempdir().full_path
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        config = os.path.join(tmp, "recipe.gin")
        open(config, "w").close()
        args_file = os.path.join(tmp, "args.txt")
        fake_python = os.path.join(tmp, "fake_python")
        with open(fake_python, "w") as f:
            f.write(f'#!/bin/sh\nprintf "%s\\n" "$@" > {args_file}\nexit 3\n')
        os.chmod(fake_python, 0o755)
        model_dir = os.path.join(tmp, "model")

        completed = self._run_and_time(
            {"DATA_DIR": data_dir, "MODEL_DIR": model_dir, "CONFIG": config,
             "PYTHON": fake_python, "NUM_GPUS": "2", "SEED": "11"},
            args=("--gin_param", "extra=1"))

        self.assertEqual(completed.returncode, 3, completed.stderr)
        with open(args_file) as f:
            self.assertEqual(f.read().splitlines(), [
                "-m", "official_maskrcnn.train",
                "--gin_file", config,
                "--model_dir", model_dir,
                "--gin_param", f"train/DatasetBuilder.file_pattern='{data_dir}/train-*'",
                "--gin_param", f"eval/DatasetBuilder.file_pattern='{data_dir}/val-*'",
                "--gin_param",
                f"coco_annotations_file='{data_dir}/annotations/instances_val2017.json'",
                "--gin_param", "num_gpus=2",
                "--gin_param", "seed=11",
                "--gin_param", "extra=1",
            ])
        stdout = completed.stdout.splitlines()
        self.assertRegex(stdout[0], r"^STARTING TIMING RUN AT \d{4}-\d\d-\d\d ")
        self.assertRegex(stdout[1], r"^ENDING TIMING RUN AT \d{4}-\d\d-\d\d ")
        self.assertRegex(stdout[2], r"^RESULT,OBJECT_DETECTION,11,\d+,[^,]+,\d{4}-\d\d-\d\d ")

    def test_default_gpu_count_follows_cuda_visible_devices(self):
        tmp = self.create_tempdir().full_path
        config = os.path.join(tmp, "recipe.gin")
        open(config, "w").close()
        args_file = os.path.join(tmp, "args.txt")
        fake_python = os.path.join(tmp, "fake_python")
        with open(fake_python, "w") as f:
            f.write(f'#!/bin/sh\nprintf "%s\\n" "$@" > {args_file}\n')
        os.chmod(fake_python, 0o755)

        completed = self._run_and_time(
            {"DATA_DIR": tmp, "MODEL_DIR": tmp, "CONFIG": config, "PYTHON": fake_python,
             "CUDA_VISIBLE_DEVICES": "0,3,5"}, unset=("NUM_GPUS", "SEED"))

        self.assertEqual(completed.returncode, 0, completed.stderr)
        with open(args_file) as f:
            self.assertIn("num_gpus=3", f.read().splitlines())
        self.assertRegex(completed.stdout, r"RESULT,OBJECT_DETECTION,,\d+,")


if __name__ == "__main__":
    tf.test.main()
