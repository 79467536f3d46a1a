"""Tests for official_maskrcnn.ops.proposals against a numpy version of the reference pipeline."""

import math

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import anchors as anchor_ops
from official_maskrcnn.ops import proposals
from tests import numerics

LEVELS = ("3", "4")


def _np_decode(deltas, anchors, clip=math.log(1000.0 / 16)):
    """maskrcnn-benchmark BoxCoder.decode, weights (1, 1, 1, 1), y-first boxes, in numpy."""
    h = anchors[:, 2] - anchors[:, 0] + 1
    w = anchors[:, 3] - anchors[:, 1] + 1
    cy, cx = anchors[:, 0] + 0.5 * h, anchors[:, 1] + 0.5 * w
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = np.minimum(deltas[:, 2], clip), np.minimum(deltas[:, 3], clip)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    return np.stack([pcy - 0.5 * ph, pcx - 0.5 * pw, pcy + 0.5 * ph - 1, pcx + 0.5 * pw - 1], 1)


def _np_iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda x: max(0.0, x[2] - x[0] + 1) * max(0.0, x[3] - x[1] + 1)  # noqa: E731
    union = area(a) + area(b) - ih * iw
    return ih * iw / union if union > 0 else 0.0


def _np_nms(boxes, scores, max_output, threshold):
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if all(_np_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
        if len(kept) == max_output:
            break
    return kept


def _np_proposals(objectness, deltas, anchors, image_size, pre, post, thresh, per_image,
                  min_size=0.0):
    """The reference RPNPostProcessor (FPN) in numpy: returns per image a list of (logit, box)."""
    batch = image_size.shape[0]
    per_level = [[] for _ in range(batch)]
    for level in LEVELS:
        for b in range(batch):
            order = np.argsort(-objectness[level][b], kind="stable")[:pre]
            logits = objectness[level][b][order]
            boxes = _np_decode(deltas[level][b][order], anchors[level][order])
            h, w = image_size[b]
            boxes = np.stack([np.clip(boxes[:, 0], 0, h - 1), np.clip(boxes[:, 1], 0, w - 1),
                              np.clip(boxes[:, 2], 0, h - 1), np.clip(boxes[:, 3], 0, w - 1)], 1)
            big = ((boxes[:, 2] - boxes[:, 0] + 1 >= min_size)
                   & (boxes[:, 3] - boxes[:, 1] + 1 >= min_size))
            logits, boxes = logits[big], boxes[big]
            kept = _np_nms(boxes, logits, post, thresh)
            per_level[b] += [(logits[i], boxes[i]) for i in kept]
    if per_image:
        return [sorted(c, key=lambda d: -d[0])[:post] for c in per_level]
    everything = sorted((d[0] for c in per_level for d in c), reverse=True)
    cut = everything[min(post, len(everything)) - 1]
    return [sorted([d for d in c if d[0] >= cut], key=lambda d: -d[0]) for c in per_level]


def _inputs(seed, batch=2):
    rng = np.random.default_rng(seed)
    anchors = anchor_ops.multilevel_anchors(64, 64, strides=(8, 16), sizes=(32, 64))
    anchors = {k: anchors[k].numpy() for k in LEVELS}
    objectness = {k: rng.normal(size=(batch, len(anchors[k]))).astype(np.float32)
                  for k in LEVELS}
    deltas = {k: (rng.normal(size=(batch, len(anchors[k]), 4)) * 0.3).astype(np.float32)
              for k in LEVELS}
    image_size = np.array([[60, 50], [64, 40]][:batch], np.int32)
    return objectness, deltas, anchors, image_size


class GenerateProposalsTest(tf.test.TestCase):

    def _check(self, out, expected, post):
        for b, dets in enumerate(expected):
            count = len(dets)
            self.assertAllEqual(out["proposal_valid"][b], np.arange(post) < count)
            scores = 1.0 / (1.0 + np.exp(-np.array([d[0] for d in dets])))
            self.assertAllClose(out["proposal_scores"][b, :count], scores, atol=1e-6)
            self.assertAllClose(out["proposal_boxes"][b, :count], [d[1] for d in dets],
                                atol=1e-4)
            self.assertAllEqual(out["proposal_boxes"][b, count:], np.zeros([post - count, 4]))
            self.assertAllEqual(out["proposal_scores"][b, count:], np.zeros(post - count))

    def test_per_image_against_numpy_eager_and_xla(self):
        objectness, deltas, anchors, image_size = _inputs(0)
        pre, post = 50, 40
        out = proposals.generate_proposals(objectness, deltas, anchors, image_size, pre, post)
        xla = tf.function(proposals.generate_proposals, jit_compile=True)(
            objectness, deltas, anchors, image_size, pre, post)
        for key in out:
            # XLA's exp differs from Eigen's by an ulp or two; decoding adds a few roundings.
            self.assertAllClose(out[key], xla[key], atol=numerics.ulps(out[key], 8))
        expected = _np_proposals(objectness, deltas, anchors, image_size, pre, post, 0.7, True)
        self.assertEqual(len(expected[0]), post)  # enough survivors to test the final cut
        self._check(out, expected, post)
        boxes = out["proposal_boxes"].numpy()
        self.assertTrue(np.all(boxes[1, :, 3] <= 39) and np.all(boxes >= 0))

    def test_per_batch_against_numpy(self):
        objectness, deltas, anchors, image_size = _inputs(1)
        # Image 1 gets much higher logits: the batch-wide cut gives it most proposals.
        objectness = {k: v + np.array([[0.0], [1.5]], np.float32) for k, v in objectness.items()}
        pre, post = 60, 30
        out = proposals.generate_proposals(objectness, deltas, anchors, image_size, pre, post,
                                           per_image=False)
        expected = _np_proposals(objectness, deltas, anchors, image_size, pre, post, 0.7, False)
        self.assertEqual(len(expected[0]) + len(expected[1]), post)
        self.assertGreater(len(expected[1]), len(expected[0]))
        self._check(out, expected, post)
        xla = tf.function(proposals.generate_proposals, jit_compile=True)(
            objectness, deltas, anchors, image_size, pre, post, per_image=False)
        for key in out:
            # XLA's exp differs from Eigen's by an ulp or two; decoding adds a few roundings.
            self.assertAllClose(out[key], xla[key], atol=numerics.ulps(out[key], 8))

    def test_min_size_and_padding_when_few_candidates(self):
        objectness, deltas, anchors, image_size = _inputs(2)
        # post larger than all candidates: output is padded, valid mask marks the real ones.
        pre, post = 5, 30
        out = proposals.generate_proposals(objectness, deltas, anchors, image_size, pre, post,
                                           nms_threshold=0.5, min_size=20.0)
        expected = _np_proposals(objectness, deltas, anchors, image_size, pre, post, 0.5, True,
                                 min_size=20.0)
        self.assertLess(len(expected[0]), 10)
        self._check(out, expected, post)

    def test_huge_deltas_are_finite_and_no_gradient(self):
        objectness, deltas, anchors, image_size = _inputs(3)
        deltas = {k: v * 1e4 for k, v in deltas.items()}
        objectness = {k: tf.Variable(v) for k, v in objectness.items()}
        deltas_vars = {k: tf.Variable(v) for k, v in deltas.items()}
        with tf.GradientTape() as tape:
            out = proposals.generate_proposals(objectness, deltas_vars, anchors, image_size,
                                               20, 20)
            total = tf.reduce_sum(out["proposal_boxes"]) + tf.reduce_sum(out["proposal_scores"])
        grads = tape.gradient(total, list(objectness.values()) + list(deltas_vars.values()))
        self.assertTrue(all(g is None for g in grads))
        for value in out.values():
            self.assertFalse(np.any(np.isnan(value.numpy().astype(np.float32))))
