"""swm-ray: distributed depth compression of LLMs by Sliding-Window Merging.

Importing the package is cheap: no torch, ray or transformers at import time.
"""

__version__ = "0.1.0"
