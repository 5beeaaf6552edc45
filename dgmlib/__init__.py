"""dgmlib: the shared library of the Deep Generative Models course.

One module per lecture topic (``flows`` so far) plus the pieces every topic shares:
``data`` (digits, 2D toys, MNIST), ``units`` (nats, bits/dim, dequantization), ``train``
(the ``fit`` loop, checkpoints, evaluation), ``plots`` and the ``dgm`` command line.
"""

from dgmlib.config import fast_mode

__all__ = ["fast_mode"]
__version__ = "0.1.0"
