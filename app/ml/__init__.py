"""Model-side code shared by the worker and the serving engine."""
