"""The way to the API: the HTTP client, its classes of capacity, and session discovery.

`client` is the one place aiohttp's client errors are met and translated
into the gateway's own (`gateway.errors`).
"""
