"""Text generation with a base model plus an adapter."""
