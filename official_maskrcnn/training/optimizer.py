"""SGD with momentum and coupled weight decay, as the MLPerf reference trains Mask R-CNN.

The reference (torch.optim.SGD, docs/REFERENCE.md "Optimiser and schedule") differs from Keras
SGD in two ways that change the trajectory, so Keras SGD cannot be used as is:
  - the learning rate multiplies the momentum buffer when it is applied, not when it is
    accumulated (v <- mu * v + g; w <- w - lr * v), so a change of rate takes effect at once
    instead of fading in through the buffer;
  - weight decay is added to the gradient (g <- g + wd * w) and so goes through momentum, while
    the base Keras optimizer's `weight_decay` is decoupled (w <- w - lr * wd * w, AdamW style).
The reference also puts biases into a second parameter group with twice the rate and no decay.
"""

import gin
import tensorflow as tf
import tf_keras

from official_maskrcnn.training import schedule as schedule_lib

# Last name components that the reference's parameter groups treat as biases ("bias" in the
# name): conv/dense biases, and the offsets of trainable normalisation layers.
BIAS_VARIABLE_NAMES = ("bias", "beta")


def _base_name(name):
    """'model/dense/bias/replica_1:0' -> 'bias': the last name component, device suffix gone."""
    name = name.split(":")[0]
    parts = name.split("/")
    # MirroredStrategy names the copies of a variable on other devices '<name>/replica_<i>'.
    if len(parts) > 1 and parts[-1].startswith("replica_"):
        parts = parts[:-1]
    return parts[-1]


def is_bias(variable):
    """Whether `variable` gets the bias treatment (rate x bias_lr_factor, bias_weight_decay).

    Decided by name only: the last component of the name (without ':0' and any scope prefix)
    is 'bias' or 'beta'. Kernels and normalisation scales ('gamma') are not biases.
    """
    return _base_name(variable.name) in BIAS_VARIABLE_NAMES


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class MomentumSGD(tf_keras.optimizers.Optimizer):
    """torch-style momentum SGD with coupled weight decay and a bias parameter group.

    For each trained variable w with gradient g and momentum slot v (same shape as w, created
    at build time, zero-initialised), one update at step t = self.iterations does:
      g' = g + wd_w * w
      v <- momentum * v + g'
      w <- w - lr_w * v
    with lr_w = lr(t) * bias_lr_factor and wd_w = bias_weight_decay for biases (see `is_bias`),
    lr_w = lr(t) and wd_w = weight_decay otherwise. Variables not passed to `apply_gradients`
    (frozen ones) are not touched. Sparse (IndexedSlices) gradients are densified, which
    applies decay and momentum to every row as the reference's dense tensors do.

    Works eagerly, inside tf.function (also with jit_compile=True), with apply_gradients called
    inside `strategy.run` of a MirroredStrategy (gradients are summed over replicas, so each
    replica's loss should be its share of the global mean), and wrapped in
    `tf_keras.mixed_precision.LossScaleOptimizer`. Slots and `iterations` are checkpointed by
    `tf.train.Checkpoint(optimizer=...)`.
    """

    def __init__(
        self,
        learning_rate,
        momentum=0.9,
        weight_decay=1e-4,
        bias_lr_factor=2.0,
        bias_weight_decay=0.0,
        name="MomentumSGD",
    ):
        """Builds the optimizer (slots are created later, by `build` or the first update).

        Args:
          learning_rate: float, or a `LearningRateSchedule` called with `self.iterations`.
          momentum: float in [0, 1).
          weight_decay: float >= 0, coupled L2 decay for non-bias variables.
          bias_lr_factor: float > 0, multiplies the rate for biases.
          bias_weight_decay: float >= 0, coupled L2 decay for biases.
          name: name scope of the optimizer's variables.
        """
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        if not bias_weight_decay >= 0.0:
            raise ValueError(f"bias_weight_decay must be >= 0, got {bias_weight_decay!r}.")
        if not bias_lr_factor > 0.0:
            raise ValueError(f"bias_lr_factor must be > 0, got {bias_lr_factor!r}.")
        # weight_decay=None: the base class's own decay is decoupled and would be applied on top
        # of ours (with 0 it would still run one no-op assign per variable and step).
        # jit_compile=False: the base class would otherwise (on GPU) compile one XLA function per
        # variable; the training step is compiled as a whole instead.
        super().__init__(name=name, weight_decay=None, jit_compile=False)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.momentum = float(momentum)
        self.coupled_weight_decay = float(weight_decay)
        self.bias_lr_factor = float(bias_lr_factor)
        self.bias_weight_decay = float(bias_weight_decay)

    @property
    def schedule(self):
        """The `LearningRateSchedule` (or the constant rate) given at construction.

        tf_keras's `learning_rate` property is not it: with a schedule, that returns the rate of
        the *last* update.
        """
        return self._learning_rate

    def build(self, var_list):
        """Creates one momentum slot per variable and fixes each variable's group.

        The group is decided here, from the variables as passed (under MirroredStrategy the
        distributed variables, whose names carry no device suffix), and looked up by index in
        `update_step`.

        Args:
          var_list: the variables this optimizer will update.
        """
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self.momentums = [
            self.add_variable_from_reference(model_variable=var, variable_name="momentum")
            for var in var_list
        ]
        # Python numbers, not variables: they are fixed per variable and need no checkpointing.
        self._bias_flags = self._no_dependency([is_bias(var) for var in var_list])
        self._built = True

    def update_step(self, gradient, variable):
        """Applies one update to `variable` (a model variable, or one replica's copy of it).

        Args:
          gradient: tensor or IndexedSlices with the shape of `variable` (summed over replicas).
          variable: the variable to update in place.
        """
        index = self._index_dict[self._var_key(variable)]
        velocity = self.momentums[index]
        dtype = variable.dtype
        if self._bias_flags[index]:
            lr_factor, weight_decay = self.bias_lr_factor, self.bias_weight_decay
        else:
            lr_factor, weight_decay = 1.0, self.coupled_weight_decay
        learning_rate = tf.cast(self.learning_rate, dtype) * lr_factor
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        gradient = tf.cast(gradient, dtype)
        if weight_decay:
            gradient = gradient + weight_decay * tf.convert_to_tensor(variable)
        velocity.assign(self.momentum * velocity + gradient)
        variable.assign_sub(learning_rate * velocity)

    def get_config(self):
        """The constructor's arguments (the base class's clipping/EMA options are not used)."""
        return {
            "name": self.name,
            "learning_rate": self._serialize_hyperparameter(self._learning_rate),
            "momentum": self.momentum,
            "weight_decay": self.coupled_weight_decay,
            "bias_lr_factor": self.bias_lr_factor,
            "bias_weight_decay": self.bias_weight_decay,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Inverse of `get_config`; leaves `config` unchanged (the base class edits it)."""
        return super().from_config(dict(config), custom_objects=custom_objects)


@gin.configurable
def build_optimizer(
    global_batch_size,
    base_learning_rate=None,
    warmup_steps=500,
    warmup_factor=1.0 / 3,
    decay_steps=None,
    decay_k=0,
    decay_factor=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    bias_lr_factor=2.0,
):
    """The reference's optimizer and schedule for `global_batch_size` images per step.

    Defaults are the reference's (docs/REFERENCE.md, "Optimiser and schedule").

    Args:
      global_batch_size: int > 0, images per optimizer step summed over all replicas.
      base_learning_rate: float, or None for 0.02 * global_batch_size / 16.
      warmup_steps: int >= 0, linear warmup length.
      warmup_factor: float in [0, 1], fraction of the base rate at step 0.
      decay_steps: increasing ints, or None for (60000, 80000) * (1 + decay_k/10) * 16 /
        global_batch_size.
      decay_k: int, the rules' K, used only when decay_steps is None.
      decay_factor: float > 0, rate multiplier at each decay step.
      momentum: float in [0, 1).
      weight_decay: float >= 0, coupled decay of non-bias variables (biases get none).
      bias_lr_factor: float > 0, rate multiplier for biases.
    Returns:
      A `MomentumSGD` whose learning rate is a `WarmupStepDecay`.
    """
    if base_learning_rate is None:
        base_learning_rate = schedule_lib.reference_learning_rate(global_batch_size)
    if decay_steps is None:
        decay_steps = schedule_lib.reference_decay_steps(global_batch_size, k=decay_k)
    learning_rate = schedule_lib.WarmupStepDecay(
        base_learning_rate=base_learning_rate,
        warmup_steps=warmup_steps,
        warmup_factor=warmup_factor,
        decay_steps=decay_steps,
        decay_factor=decay_factor,
        step_offset=1,  # the reference's n-th update (from 1) uses lr(n)
    )
    return MomentumSGD(
        learning_rate=learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
        bias_lr_factor=bias_lr_factor,
    )


def learning_rate_schedule(optimizer):
    """The schedule (or the constant rate) a `MomentumSGD` was built with; unwraps a
    `LossScaleOptimizer`. Another tf_keras optimizer gives its `learning_rate` (with a schedule,
    that is the rate of its last update)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(inner, MomentumSGD):
        return inner.schedule
    return inner.learning_rate


def next_learning_rate(optimizer):
    """The rate the optimizer's next update uses, as a python float."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = learning_rate_schedule(optimizer)
    if isinstance(rate, tf_keras.optimizers.schedules.LearningRateSchedule):
        rate = rate(inner.iterations)
    return float(tf.convert_to_tensor(rate).numpy())
