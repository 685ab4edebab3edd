"""small4: an inference engine and OpenAI-compatible server for Mistral Small 4."""
