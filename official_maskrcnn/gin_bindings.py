"""Reading a value the parsed gin config binds, as the configurable would receive it."""

import gin


def bound_value(*selectors, default=None):
    """The value bound to the first of `selectors` that gin binds (e.g.
    "train/DatasetBuilder.min_size", then "DatasetBuilder.min_size"), a macro (`%size`)
    resolved to its value; `default` when none is bound."""
    for selector in selectors:
        try:
            value = gin.query_parameter(selector)
        except ValueError:  # the configurable has no bound parameters, or not this one
            continue
        if isinstance(value, gin.config.ConfigurableReference):
            value = value.scoped_configurable_fn()
        return value
    return default
