"""Each loss against an independent numpy implementation of the reference's definition."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.modeling import losses


def np_smooth_l1(x, y, beta):
    d = np.abs(x - y)
    return np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def np_bce(logits, labels):
    """Numerically plain sigmoid cross-entropy, as torch's formula."""
    p = 1.0 / (1.0 + np.exp(-logits))
    return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


class LossesTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.rng = np.random.default_rng(0)

    def test_smooth_l1_hand_values(self):
        got = losses.smooth_l1(tf.constant([0.0, 0.05, 1.0, -2.0]), tf.zeros([4]), 1.0 / 9)
        # 0; 0.5 * 0.05^2 * 9 = 0.01125; 1 - 1/18; 2 - 1/18
        self.assertAllClose(got, [0.0, 0.01125, 1 - 1 / 18, 2 - 1 / 18], atol=1e-6)

    def test_rpn_losses(self):
        b, n = 2, 50
        logits = self.rng.normal(size=(b, n)).astype(np.float32)
        deltas = self.rng.normal(size=(b, n, 4)).astype(np.float32)
        targets = self.rng.normal(size=(b, n, 4)).astype(np.float32)
        labels = self.rng.choice([-1, 0, 1], size=(b, n)).astype(np.int32)
        got = losses.rpn_losses(logits, deltas, labels, targets)
        # Reference: concatenate the batch, keep sampled anchors, mean BCE; box loss summed over
        # positives divided by the number of sampled anchors.
        flat_labels = labels.reshape(-1)
        sampled = flat_labels >= 0
        want_score = np_bce(logits.reshape(-1)[sampled], (flat_labels[sampled] == 1)).mean()
        positive = flat_labels == 1
        want_box = np_smooth_l1(deltas.reshape(-1, 4)[positive], targets.reshape(-1, 4)[positive],
                                1.0 / 9).sum() / sampled.sum()
        self.assertAllClose(got["rpn_score_loss"], want_score, rtol=1e-5)
        self.assertAllClose(got["rpn_box_loss"], want_box, rtol=1e-5)

    def test_box_head_losses(self):
        b, s, k = 2, 12, 5
        logits = self.rng.normal(size=(b, s, k)).astype(np.float32)
        deltas = self.rng.normal(size=(b, s, k, 4)).astype(np.float32)
        classes = self.rng.integers(0, k, size=(b, s)).astype(np.int32)
        targets = self.rng.normal(size=(b, s, 4)).astype(np.float32)
        valid = self.rng.random((b, s)) < 0.8
        got = losses.box_head_losses(logits, deltas, classes, targets, valid)
        lg, cl = logits[valid], classes[valid]
        log_softmax = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        want_class = -log_softmax[np.arange(len(cl)), cl].mean()
        fg = valid & (classes > 0)
        own = deltas[fg][np.arange(fg.sum()), classes[fg]]
        want_box = np_smooth_l1(own, targets[fg], 1.0).sum() / valid.sum()
        self.assertAllClose(got["frcnn_class_loss"], want_class, rtol=1e-5)
        self.assertAllClose(got["frcnn_box_loss"], want_box, rtol=1e-5)

    def test_mask_loss(self):
        b, s, p, k = 2, 6, 28, 4
        logits = self.rng.normal(size=(b, s, p, p, k)).astype(np.float32)
        targets = (self.rng.random((b, s, p, p)) < 0.5).astype(np.float32)
        classes = self.rng.integers(1, k, size=(b, s)).astype(np.int32)
        fg = self.rng.random((b, s)) < 0.5
        fg[0, 0] = True
        got = losses.mask_loss(logits, targets, classes, fg)
        own = logits[fg][np.arange(fg.sum()), :, :, classes[fg]]
        want = np_bce(own, targets[fg]).mean()
        self.assertAllClose(got["mask_loss"], want, rtol=1e-5)

    def test_no_foreground_and_no_sample_give_finite_zero_losses(self):
        got = losses.rpn_losses(tf.zeros([1, 4]), tf.zeros([1, 4, 4]), -tf.ones([1, 4], tf.int32),
                                tf.zeros([1, 4, 4]))
        got.update(losses.box_head_losses(tf.zeros([1, 3, 2]), tf.zeros([1, 3, 2, 4]),
                                          tf.zeros([1, 3], tf.int32), tf.zeros([1, 3, 4]),
                                          tf.zeros([1, 3], tf.bool)))
        got.update(losses.mask_loss(tf.zeros([1, 3, 28, 28, 2]), tf.zeros([1, 3, 28, 28]),
                                    tf.zeros([1, 3], tf.int32), tf.zeros([1, 3], tf.bool)))
        for name, value in got.items():
            self.assertEqual(float(value), 0.0, name)

    def test_float32_under_bfloat16_logits_and_xla(self):
        logits = tf.cast(self.rng.normal(size=(1, 8)), tf.bfloat16)
        labels = tf.constant([[1, 0, -1, 1, 0, 0, -1, 1]])
        fn = tf.function(losses.rpn_losses, jit_compile=True)
        got = fn(logits, tf.zeros([1, 8, 4], tf.bfloat16), labels, tf.ones([1, 8, 4]))
        self.assertEqual(got["rpn_score_loss"].dtype, tf.float32)
        eager = losses.rpn_losses(logits, tf.zeros([1, 8, 4], tf.bfloat16), labels,
                                  tf.ones([1, 8, 4]))
        self.assertAllClose(got["rpn_box_loss"], eager["rpn_box_loss"])


if __name__ == "__main__":
    tf.test.main()
