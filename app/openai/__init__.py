"""OpenAI-compatible fine-tuning API: `/v1/fine_tuning/jobs` over the native job service."""
