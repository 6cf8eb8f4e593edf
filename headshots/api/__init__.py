"""The studios' HTTP API (FastAPI): `headshots serve`. See app.py for the routes."""
