"""Faults injected for real, importable by the workers (they share the tests' sys.path)."""


def oom_above(t, limit):
    """Inside a model's call: TensorFlow's out-of-memory error for batches above ``limit``.

    The batch dimension is static in nbtool's compiled signature, so the error is raised
    while tracing a batch that is too big, exactly where a real allocation would fail.
    """
    import tensorflow as tf

    n = t.shape[0]
    if n is not None and n > limit:
        raise tf.errors.ResourceExhaustedError(
            None, None, f"OOM when allocating tensor with shape [{n}, 8] (injected above {limit})")
    return t
