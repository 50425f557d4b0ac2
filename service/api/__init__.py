"""The HTTP gateway (FastAPI): app factory, dependencies, error translation, routes."""
