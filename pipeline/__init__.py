"""Stage one: models, the model registry, view geometry and the cache build."""

__version__ = "0.1.0"
