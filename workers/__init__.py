"""Thin glue between the service edges and the compute in models/."""
