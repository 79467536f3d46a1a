"""Balanced positive / negative sampling with static shapes, as maskrcnn-benchmark's sampler.

Shape legend: `...` any leading batch dimensions (e.g. B images), each sampled independently;
M candidates per image (anchors or proposals).

The reference draws `torch.randperm` over each image's positives and negatives and keeps a prefix.
Here every candidate gets a random score, a hash of (seed, position), and the top-k scores among
the positives (negatives) are kept, with k = the per-image count; k varies per image, so a static
top_k of the largest possible count is taken and the entries past the count are dropped.
Positives and negatives are disjoint, so one draw serves both.

Why a hash rather than `tf.random.stateless_uniform`: under `jit_compile=True` the latter returns
different numbers than eagerly for the same seed and algorithm (tensorflow/tensorflow#121243, a
known limitation), so eager tests would not describe the compiled training step. The hash below
uses only uint32 multiply / xor / shift, which are bit-exact in both modes.
"""

import tensorflow as tf

# Score of a non-candidate; candidates score in [0, 2**31), so they always rank first.
_NOT_A_CANDIDATE = -1
# Constants of MurmurHash3's 32-bit finaliser and of the golden-ratio (Weyl) sequence.
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9
_LOW_32_BITS = 0xFFFFFFFF


def _u32(value):
    return tf.constant(value, tf.uint32)


def _fmix32(x):
    """MurmurHash3's finaliser: a bijection of uint32 with good avalanche."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))
    x = x * _u32(_FMIX_C1)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(13)))
    x = x * _u32(_FMIX_C2)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))


def random_scores(shape, seed):
    """Uniform random int32 scores in [0, 2**31), a stateless function of (seed, position).

    Identical eagerly and under XLA (unlike tf.random.stateless_*). Scores of different positions
    are independent for practical purposes (a hash, not a cryptographic generator).

    Args:
      shape: static python shape [R, M] with R * M < 2**32.
      seed: [2] int32 or int64 tensor; all 128 bits of an int64 seed are used.
    Returns:
      [R, M] int32.
    """
    seed = tf.reshape(tf.cast(seed, tf.int64), [2])
    low = tf.bitwise.bitwise_and(seed, _LOW_32_BITS)
    high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(seed, 32), _LOW_32_BITS)
    words = tf.cast(tf.stack([low, high], axis=-1), tf.uint32)  # [2, 2] (seed word, low/high)
    key = _u32(0)
    for i in range(2):
        for j in range(2):
            key = _fmix32(tf.bitwise.bitwise_xor(key, words[i, j]) + _u32(_GOLDEN))
    num_rows, num_cols = shape
    position = tf.cast(tf.range(num_rows * num_cols, dtype=tf.int64), tf.uint32)
    bits = _fmix32(_fmix32(position * _u32(_GOLDEN) + key) + key)
    scores = tf.cast(tf.bitwise.right_shift(bits, _u32(1)), tf.int32)
    return tf.reshape(scores, [num_rows, num_cols])


def _top_k_mask(scores, count, k):
    """Marks the `count` highest-scoring entries per row.

    Args:
      scores: [R, M] int32.
      count: [R] int32, per row, at most k.
      k: python int, static upper bound of count, at most M.
    Returns:
      [R, M] bool, True at exactly `count` positions per row (top_k returns distinct indices).
    """
    num_rows = tf.shape(scores)[0]
    _, top_indices = tf.math.top_k(scores, k=k, sorted=True)  # [R, k]
    keep = tf.range(k, dtype=tf.int32)[None, :] < count[:, None]  # [R, k]
    row = tf.broadcast_to(tf.range(num_rows, dtype=tf.int32)[:, None], tf.shape(top_indices))
    indices = tf.stack([row, top_indices], axis=-1)  # [R, k, 2]
    # Indices are distinct within a row, so the sum is 0 or 1.
    hits = tf.scatter_nd(indices, tf.cast(keep, tf.int32), tf.shape(scores))
    return hits > 0


def sample_balanced(labels_positive, labels_negative, num_samples, positive_fraction, seed):
    """Samples at most `num_samples` candidates per image, a `positive_fraction` of positives.

    Reference semantics (BalancedPositiveNegativeSampler), per image:
      num_pos = min(#positives, int(num_samples * positive_fraction)),
      num_neg = min(#negatives, num_samples - num_pos),
    each chosen uniformly at random without replacement among the candidates.

    Args:
      labels_positive: [..., M] bool, positive candidates.
      labels_negative: [..., M] bool, negative candidates, disjoint from the positives.
      num_samples: python int, samples per image (256 for the RPN, 512 for the ROI heads).
      positive_fraction: python float in [0, 1] (0.5 for the RPN, 0.25 for the ROI heads).
      seed: [2] int32 or int64 tensor, the stateless random seed.
    Returns:
      (sampled_positive, sampled_negative): [..., M] bool each, subsets of the candidates.
    """
    if num_samples < 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"sample_balanced: expected num_samples >= 0 and positive_fraction in "
                         f"[0, 1], found {num_samples} and {positive_fraction}.")
    labels_positive = tf.convert_to_tensor(labels_positive, tf.bool)
    labels_negative = tf.convert_to_tensor(labels_negative, tf.bool)
    shape = tf.shape(labels_positive)
    num_candidates = labels_positive.shape[-1]
    if num_candidates is None:
        raise ValueError("sample_balanced: expected a static number of candidates M, found None.")
    positive = tf.reshape(labels_positive, [-1, num_candidates])  # [R, M]
    negative = tf.reshape(labels_negative, [-1, num_candidates])

    max_pos = int(num_samples * positive_fraction)  # The reference's int(): truncation.
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=-1), max_pos)  # [R]
    num_neg = tf.minimum(tf.reduce_sum(tf.cast(negative, tf.int32), axis=-1),
                         num_samples - num_pos)

    num_rows = positive.shape[0]
    if num_rows is None:
        raise ValueError("sample_balanced: expected static leading dimensions, found "
                         f"{labels_positive.shape}.")
    random = random_scores([num_rows, num_candidates], seed)
    pos_scores = tf.where(positive, random, _NOT_A_CANDIDATE)
    neg_scores = tf.where(negative, random, _NOT_A_CANDIDATE)
    # Counts never exceed the candidates, so the kept top-k entries are all candidates.
    sampled_positive = _top_k_mask(pos_scores, num_pos, min(max_pos, num_candidates))
    sampled_negative = _top_k_mask(neg_scores, num_neg, min(num_samples, num_candidates))
    return tf.reshape(sampled_positive, shape), tf.reshape(sampled_negative, shape)
