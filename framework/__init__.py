"""prism core: registries, plugin discovery, configuration, parallelism, the training loop.

Nothing in this package names a concrete model, objective, task or dataset; it finds them through
the registries in :mod:`prism.framework.registry`, which :mod:`prism.framework.plugins` fills.
"""

__version__ = "0.1.0"
