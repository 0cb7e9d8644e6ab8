"""Evals in OpenAI's shape: graders over a model's answers to the user's own data items."""
