"""Tuneforge: a self-hostable fine-tuning-as-a-service backend."""
