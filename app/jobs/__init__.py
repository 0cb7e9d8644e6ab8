"""Fine-tuning jobs: create, list, inspect, cancel, read their events."""
