"""zypher-ws: an event-driven ML inference service on aiohttp."""

__version__ = "0.1.0"
