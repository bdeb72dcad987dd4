"""The ports: the worker-facing proxy and the admin API, and what guards them.

The server and its middleware, the request path (`proxy`), poll admission
and the overload manager. The only place aiohttp's server is used.
"""
