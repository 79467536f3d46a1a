"""Tests for official_maskrcnn.ops.sampling: exact counts, support, determinism, uniformity."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import sampling


def numpy_counts(positive, negative, num_samples, positive_fraction):
    """BalancedPositiveNegativeSampler's per-image counts, in numpy: ([R], [R])."""
    num_pos = np.minimum(positive.sum(-1), int(num_samples * positive_fraction))
    num_neg = np.minimum(negative.sum(-1), num_samples - num_pos)
    return num_pos, num_neg


def _random_labels(rng, shape, pos_rate, neg_rate):
    """Disjoint random positive and negative masks."""
    draw = rng.random(shape)
    return draw < pos_rate, (draw >= pos_rate) & (draw < pos_rate + neg_rate)


class SampleBalancedTest(tf.test.TestCase):

    def _check(self, positive, negative, num_samples, fraction, seed):
        sampled_pos, sampled_neg = sampling.sample_balanced(
            positive, negative, num_samples, fraction, tf.constant(seed))
        sampled_pos, sampled_neg = sampled_pos.numpy(), sampled_neg.numpy()
        self.assertEqual(sampled_pos.shape, positive.shape)
        self.assertFalse(np.any(sampled_pos & ~positive), "positive sampled outside candidates")
        self.assertFalse(np.any(sampled_neg & ~negative), "negative sampled outside candidates")
        num_pos, num_neg = numpy_counts(positive, negative, num_samples, fraction)
        self.assertAllEqual(sampled_pos.sum(-1), num_pos)
        self.assertAllEqual(sampled_neg.sum(-1), num_neg)
        return sampled_pos, sampled_neg

    def test_exact_counts_on_many_random_cases(self):
        rng = np.random.default_rng(0)
        cases = 0
        for num_candidates in (1, 7, 300, 2000):
            for pos_rate, neg_rate in ((0.0, 0.9), (0.01, 0.02), (0.3, 0.5), (0.6, 0.1),
                                       (0.0, 0.0), (0.5, 0.5)):
                for num_samples, fraction in ((256, 0.5), (512, 0.25), (16, 0.5), (10, 0.33),
                                              (5, 0.0), (5, 1.0)):
                    positive, negative = _random_labels(rng, [4, num_candidates], pos_rate,
                                                        neg_rate)
                    self._check(positive, negative, num_samples, fraction,
                                rng.integers(0, 2**31, size=2))
                    cases += 1
        self.assertEqual(cases, 144)

    def test_leading_batch_dims(self):
        rng = np.random.default_rng(1)
        positive, negative = _random_labels(rng, [2, 3, 100], 0.2, 0.5)
        sampled_pos, _ = self._check(
            positive.reshape(6, 100), negative.reshape(6, 100), 32, 0.25, [3, 4])
        nested_pos, _ = sampling.sample_balanced(positive, negative, 32, 0.25, tf.constant([3, 4]))
        self.assertAllEqual(nested_pos.numpy().reshape(6, 100), sampled_pos)
        single_pos, single_neg = sampling.sample_balanced(positive[0, 0], negative[0, 0], 32, 0.25,
                                                          tf.constant([3, 4]))
        self.assertEqual(single_pos.shape, [100])
        self.assertEqual(int(tf.reduce_sum(tf.cast(single_pos, tf.int32))),
                         min(positive[0, 0].sum(), 8))

    def test_deterministic_for_a_seed_and_different_for_another(self):
        rng = np.random.default_rng(2)
        positive, negative = _random_labels(rng, [2, 5000], 0.1, 0.8)
        first = sampling.sample_balanced(positive, negative, 256, 0.5, tf.constant([7, 8]))
        again = sampling.sample_balanced(positive, negative, 256, 0.5, tf.constant([7, 8]))
        int64_seed = sampling.sample_balanced(positive, negative, 256, 0.5,
                                              tf.constant([7, 8], tf.int64))
        other = sampling.sample_balanced(positive, negative, 256, 0.5, tf.constant([7, 9]))
        for a, b, c in zip(first, again, int64_seed):
            self.assertAllEqual(a, b)
            self.assertAllEqual(a, c)
        self.assertNotAllEqual(first[0], other[0])
        self.assertNotAllEqual(first[1], other[1])
        # The two images of the batch are sampled independently.
        both = np.stack([positive[0], positive[0]])
        sampled, _ = sampling.sample_balanced(both, ~both, 256, 0.5, tf.constant([7, 8]))
        self.assertNotAllEqual(sampled[0], sampled[1])

    def test_roughly_uniform(self):
        # 10 positive candidates, 2 kept: each is kept with probability 0.2; 30 negatives, 2 kept.
        positive = np.zeros([60], bool)
        positive[[1, 5, 8, 13, 21, 22, 23, 40, 50, 59]] = True
        negative = ~positive
        negative[[0, 2, 3, 4, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 24, 25]] = False
        sample = tf.function(lambda seed: sampling.sample_balanced(
            positive, negative, 4, 0.5, seed))
        num_seeds = 1000
        pos_hits = np.zeros([60])
        neg_hits = np.zeros([60])
        for s in range(num_seeds):
            sampled_pos, sampled_neg = sample(tf.constant([s, 12345]))
            pos_hits += sampled_pos.numpy()
            neg_hits += sampled_neg.numpy()
        for hits, candidates, p in ((pos_hits, positive, 0.2), (neg_hits, negative, 2 / 31)):
            self.assertEqual(hits[~candidates].sum(), 0)
            expected = num_seeds * p
            sigma = np.sqrt(num_seeds * p * (1 - p))
            self.assertAllInRange(hits[candidates], expected - 4.5 * sigma, expected + 4.5 * sigma)
            # Chi-square over the candidates, loose bound (dof = count - 1, mean ~ dof).
            chi2 = ((hits[candidates] - expected) ** 2 / expected).sum()
            self.assertLess(chi2, 3 * candidates.sum() + 10)
        # Over a batch of identical rows with one seed as well.
        rows = 2000
        sampled_pos, _ = sampling.sample_balanced(np.tile(positive, [rows, 1]),
                                                  np.tile(negative, [rows, 1]), 4, 0.5,
                                                  tf.constant([0, 0]))
        hits = sampled_pos.numpy().sum(0)
        sigma = np.sqrt(rows * 0.2 * 0.8)
        self.assertAllInRange(hits[positive], rows * 0.2 - 4.5 * sigma, rows * 0.2 + 4.5 * sigma)

    def test_random_scores_range_and_xla(self):
        seed = tf.constant([2**40 + 3, -5], tf.int64)
        scores = sampling.random_scores([3, 20000], seed)
        compiled = tf.function(lambda s: sampling.random_scores([3, 20000], s), jit_compile=True)
        self.assertAllEqual(compiled(seed), scores)
        scores = scores.numpy().astype(np.float64) / 2**31
        self.assertAllInRange(scores, 0.0, 1.0)
        # 60000 uniform scores (integer hashing: the same on every CPU): the mean's standard
        # error is 0.29 / sqrt(60000) = 0.0012 and a tenth-bin's 0.0012, so 0.01 is 8 sigma.
        self.assertNear(scores.mean(), 0.5, 0.01)
        self.assertNear(np.histogram(scores, bins=10, range=(0, 1))[0].min() / scores.size, 0.1,
                        0.01)

    def test_under_xla_matches_eager(self):
        rng = np.random.default_rng(3)
        positive, negative = _random_labels(rng, [2, 3000], 0.05, 0.6)
        seed = tf.constant([11, 12])
        eager = sampling.sample_balanced(positive, negative, 256, 0.5, seed)
        compiled = tf.function(lambda p, n, s: sampling.sample_balanced(p, n, 256, 0.5, s),
                               jit_compile=True)(positive, negative, seed)
        for a, b in zip(eager, compiled):
            self.assertAllEqual(a, b)

    def test_rejects_bad_fraction(self):
        with self.assertRaisesRegex(ValueError, "positive_fraction in"):
            sampling.sample_balanced([True], [False], 4, 1.5, tf.constant([0, 0]))


if __name__ == "__main__":
    tf.test.main()
