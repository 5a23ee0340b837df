"""Talking to Ollama: the one shared client and its transport, the model registry, warm-up, structured-output formats, the FastAPI dependencies that hand them out. Imports core and config."""
