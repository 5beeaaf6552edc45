"""dgmlib: the shared library of the Deep Generative Models course.

One module per lecture topic (``flows``, ``revnet``, ``dequantization``, ``vae``, ``ode``, ``cnf``,
``diffusion``) plus the pieces every topic shares: ``data`` (digits, 2D toys, MNIST), ``units``
(nats and bits/dim), ``train`` (the ``fit`` loop, checkpoints, evaluation), ``plots``, ``models``
(the registry) and the ``dgm`` command line.
"""

from dgmlib.config import fast_mode

__all__ = ["fast_mode"]
__version__ = "0.1.0"
