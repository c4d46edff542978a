"""The service package. Modules are wired together in app.py only."""
