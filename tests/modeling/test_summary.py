"""The list of layers: counts add up to the model's, frozen layers show no trainable params."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.modeling import summary
from official_maskrcnn.modeling.backbones import resnet


class SummaryTest(tf.test.TestCase):

    def test_counts_match_the_model_and_freezing(self):
        model = resnet.ResNet(depth=18, norm="frozen_bn", freeze_at=2)
        model(tf.zeros([1, 64, 64, 3]))
        rows = summary.layer_rows(model)
        self.assertEqual(sum(r[2] for r in rows), model.count_params())
        trainable = int(sum(np.prod(v.shape) for v in model.trainable_variables))
        self.assertEqual(sum(r[3] for r in rows), trainable)
        by_path = {path: (kind, params, train) for path, kind, params, train in rows}
        stem = [v for p, v in by_path.items() if p.endswith("/conv1")]
        self.assertLen(stem, 1)
        self.assertEqual(stem[0][2], 0)  # the stem is frozen
        self.assertTrue(all(v[2] == 0 for v in by_path.values() if v[0] == "FrozenBatchNorm"))
        self.assertTrue(any(v[2] > 0 for v in by_path.values()))
        text = summary.format_layer_table(model)
        self.assertIn(f"{model.count_params():,}", text.splitlines()[-1])
        self.assertLen(text.splitlines(), len(rows) + 2)


if __name__ == "__main__":
    tf.test.main()
