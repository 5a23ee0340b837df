"""OpenAI compatibility: OpenAI requests to Ollama requests and Ollama answers to OpenAI answers, and the /v1 wire schemas. Imports observe, guard, upstream, core and config."""
