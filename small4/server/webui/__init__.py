"""The built-in chat page: static files served by `server/webui_routes.py`; no Python here."""
