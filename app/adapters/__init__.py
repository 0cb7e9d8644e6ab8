"""Trained adapters: metadata and download."""
