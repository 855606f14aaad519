"""Reading Lattice checkpoints without the framework that wrote them, and converting them to and
from other checkpoint formats (orbax here; ``tf.train.Checkpoint`` in ``tf.py``).

``arrays`` needs only numpy; ``orbax`` imports JAX and orbax when used.
"""
