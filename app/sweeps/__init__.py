"""Sweeps: which method and settings are best for a user's data, measured by training each as a job."""
