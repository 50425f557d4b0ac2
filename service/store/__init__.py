"""Persistence: database tables and sessions, and blob storage (the only code building paths)."""
