"""The HTTP layer: the only package that knows aiohttp.web. Handlers are thin; the core is in zypher_ws."""
