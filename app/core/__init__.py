"""Shared plumbing: settings, database, object storage, errors, ids, queue."""
