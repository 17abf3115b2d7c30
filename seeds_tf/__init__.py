"""seeds_tf: identify plant species from photos of their seeds.

A DEEPaaS model plugin around one shared Keras classifier (Xception by default).
Importing the package does no I/O and no TensorFlow work.
"""

__version__ = "1.0.0"
