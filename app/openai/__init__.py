"""OpenAI's API over Tuneforge's services: fine-tuning over the jobs, inference over text generation."""
