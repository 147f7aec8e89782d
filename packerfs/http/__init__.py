"""The HTTP piece gateway: gateway.py (ASGI app: requests to bins), server.py (hypercorn over PackService)."""
