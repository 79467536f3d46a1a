"""The compliance checker's output parsed into failures and warnings (no subprocess here; the
end-to-end checks of written logs are in test_mlperf_logger.py and test_train.py)."""

import tensorflow as tf

from official_maskrcnn.training import mlperf_compliance


class CheckerOutputParsingTest(tf.test.TestCase):
    """parse_checker_output on a sample in the checker's own format (no subprocess)."""

    def test_splits_messages_into_failures_and_warnings_with_their_keys(self):
        separator = "\n" + "-" * 30 + "\n"
        messages = [
            "Required EXACTLY_ONE occurrence of 'seed_like' but found 2",
            "Required EXACTLY_ONE occurrence of 'train_samples' but found 0",
            "CHECK for 'run_stop' failed in line 4:\n:::MLLOG {\"key\": \"run_stop\"}\n"
            "failed test: 'status' in v['metadata']",
            "Failed checks for eval_accuracy : v['value']['BBOX'] >= 0.377",
            "Required AT_LEAST_ONE occurrence of 'eval_start' or 'block_start'",
            "Failed executing CHECK code:\nv['value'] > 0\ntriggered by line:\n"
            ":::MLLOG {\"key\": \"global_batch_size\", \"value\": \"x\"}",
        ]
        output = ("INFO - Running compliance on file: x.log\n"
                  "WARNING -  " + separator.join(messages) + "\nERROR - FAILED\n")

        result = mlperf_compliance.parse_checker_output(output, passed=False)

        self.assertEqual([w.keys for w in result.warnings], [{"seed_like"}])
        self.assertEqual([f.keys for f in result.failures], [
            {"train_samples"}, {"run_stop"}, {"eval_accuracy"}, {"eval_start", "block_start"},
            {"global_batch_size"}])
        self.assertEqual(result.failures[1].text, messages[2])


if __name__ == "__main__":
    tf.test.main()
