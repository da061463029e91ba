"""zypher-ws: an event-driven ML inference service on aiohttp."""

from .progress import Progress

__version__ = "0.1.0"
__all__ = ["Progress", "__version__"]
