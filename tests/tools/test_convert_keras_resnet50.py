"""Tests for official_maskrcnn.tools.convert_keras_resnet50 against tf_keras's own ResNet50.

A randomly initialised tf_keras.applications.ResNet50 (random kernels, conv biases and BN
statistics) is saved with save_weights, converted, loaded into our backbone, and our C2..C5 are
compared with Keras's conv{2..5}_block*_out activations on the same input.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.backbones.checkpoint import load_backbone_checkpoint
from official_maskrcnn.modeling.backbones.resnet import ResNet
from official_maskrcnn.tools import convert_keras_resnet50 as ck
from official_maskrcnn.tools.convert_r50_pkl import ConversionError

IMAGE_SIZE = 64
# Our output level -> the Keras activation it must equal.
KERAS_OUTPUTS = {
    "2": "conv2_block3_out",
    "3": "conv3_block4_out",
    "4": "conv4_block6_out",
    "5": "conv5_block3_out",
}
RELATIVE_TOLERANCE = 1e-3


def _randomise(keras_model, seed=0):
    """He-scaled kernels, random conv biases and non-trivial BN parameters and statistics.

    The last BN of each residual branch (`_3_bn`) gets a small gamma so that 16 residual
    additions keep activations O(1).
    """
    rng = np.random.default_rng(seed)
    for layer in keras_model.layers:
        if isinstance(layer, tf_keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            std = np.sqrt(2.0 / (kh * kw * cin))
            layer.kernel.assign(rng.standard_normal([kh, kw, cin, cout]) * std)
            layer.bias.assign(rng.standard_normal([cout]) * 0.1)
        elif isinstance(layer, tf_keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            low, high = (0.1, 0.3) if layer.name.endswith("_3_bn") else (0.5, 1.0)
            layer.gamma.assign(rng.uniform(low, high, [c]))
            layer.beta.assign(rng.standard_normal([c]) * 0.1)
            layer.moving_mean.assign(rng.standard_normal([c]) * 0.1)
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, [c]))


@pytest.fixture(scope="module")
def keras_r50(tmp_path_factory):
    """(keras model with random weights, path of its save_weights .h5)."""
    model = tf_keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    _randomise(model)
    path = str(tmp_path_factory.mktemp("keras") / "resnet50_weights.h5")
    model.save_weights(path)
    return model, path


def test_keras_prefix_mapping():
    assert ck.keras_prefix("conv1") == "conv1"
    assert ck.keras_prefix("res2_0_branch1") == "conv2_block1_0"
    assert ck.keras_prefix("res3_0_branch2a") == "conv3_block1_1"
    assert ck.keras_prefix("res4_5_branch2b") == "conv4_block6_2"
    assert ck.keras_prefix("res5_2_branch2c") == "conv5_block3_3"
    with pytest.raises(ConversionError):
        ck.keras_prefix("fc1000")


def test_fold_batch_norm_matches_keras_layer():
    rng = np.random.default_rng(1)
    c = 8
    bn = tf_keras.layers.BatchNormalization(epsilon=ck.KERAS_BN_EPSILON)
    bn.build([None, c])
    gamma, beta = rng.uniform(0.5, 1.5, [c]), rng.standard_normal([c])
    mean, var = rng.standard_normal([c]), rng.uniform(0.5, 1.5, [c])
    for variable, value in zip((bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance),
                               (gamma, beta, mean, var)):
        variable.assign(value)
    conv_bias = rng.standard_normal([c])
    x = rng.standard_normal([5, c]).astype(np.float32)
    expected = bn(x + conv_bias.astype(np.float32), training=False).numpy()
    scale, bias = ck.fold_batch_norm(gamma, beta, mean, var, ck.KERAS_BN_EPSILON, conv_bias)
    np.testing.assert_allclose(x * scale + bias, expected, rtol=1e-5, atol=1e-5)


def test_features_match_keras(keras_r50, tmp_path):
    keras_model, path = keras_r50
    prefix = str(tmp_path / "ckpt" / "r50_keras")
    report = ck.convert(path, prefix)
    assert report["include_top"] is False
    assert report["unused"] == []
    assert len(report["assigned"]) == 53  # stem + 16 blocks x 3 + 4 projections
    assert os.path.exists(prefix + ".index")

    ours = ResNet(depth=50, norm="frozen_bn")
    load_backbone_checkpoint(ours, prefix)
    images = tf.random.stateless_uniform(
        [2, IMAGE_SIZE, IMAGE_SIZE, 3], seed=[3, 4], minval=-120.0, maxval=120.0)
    probe = tf_keras.Model(
        keras_model.input, [keras_model.get_layer(n).output for n in KERAS_OUTPUTS.values()])
    expected = dict(zip(KERAS_OUTPUTS, probe(images, training=False)))
    got = ours(images, training=False)
    for level in KERAS_OUTPUTS:
        want = expected[level].numpy()
        have = got[level].numpy()
        assert have.shape == want.shape, level
        magnitude = np.abs(want).max()
        assert magnitude > 1e-2, (level, magnitude)  # non-trivial activations
        error = np.abs(have - want).max() / magnitude
        print(f"C{level}: max |diff| / max |keras| = {error:.2e}")
        assert error < RELATIVE_TOLERANCE, (level, error)


def test_include_top_weights_are_accepted(tmp_path):
    model = tf_keras.applications.ResNet50(weights=None, include_top=True)
    path = str(tmp_path / "with_top.h5")
    model.save_weights(path)
    report = ck.convert(path, str(tmp_path / "ckpt"))
    assert report["include_top"] is True
    assert report["unused"] == ["predictions"]


def test_not_hdf5_is_an_error(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("not weights")
    with pytest.raises(ConversionError, match="not an HDF5 file"):
        ck.convert(str(path), str(tmp_path / "ckpt"))
    with pytest.raises(ConversionError, match="no such file"):
        ck.convert(str(tmp_path / "missing.h5"), str(tmp_path / "ckpt"))


def test_other_keras_weights_are_an_error(tmp_path):
    other = tf_keras.Sequential([tf_keras.Input([4]), tf_keras.layers.Dense(3)])
    path = str(tmp_path / "dense.h5")
    other.save_weights(path)
    with pytest.raises(ConversionError, match="not the weights of"):
        ck.convert(path, str(tmp_path / "ckpt"))
    assert not os.path.exists(str(tmp_path / "ckpt.index"))


def test_cli_exit_codes(keras_r50, tmp_path, capsys):
    _, path = keras_r50
    prefix = str(tmp_path / "out" / "r50")
    assert ck.main(["--input", path, "--output", prefix]) == 0
    assert os.path.exists(prefix + ".index")
    assert "wrote" in capsys.readouterr().out

    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x00" * 16)
    assert ck.main(["--input", str(bad), "--output", str(tmp_path / "bad")]) == 1
    assert "error:" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        ck.main(["--input", path])
    assert exit_info.value.code == 2
