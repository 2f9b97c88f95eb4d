"""A websocket recognition server with per-chunk exits, and the page it serves (see splitformer/serve.py)."""
