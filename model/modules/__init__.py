"""Reusable layers; model/ensemble.py assembles them into the unirank model."""
