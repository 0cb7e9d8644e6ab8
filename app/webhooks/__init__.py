"""Webhooks: tenants' endpoints, the outbox of job events written with each change of state, and its delivery."""
