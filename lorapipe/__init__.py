"""lorapipe's core: the manifest, the configuration models, workspace layout and safe file writes.

Nothing here imports prefect; flows/, tasks/, captioners/ and trainer/ all build on it.
"""

__version__ = "0.1.0"
