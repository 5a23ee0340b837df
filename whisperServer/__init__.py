"""The whisper service, a program of its own (python -m whisperServer): faster-whisper behind OpenAI's audio API. Imports core and config, never the main service's packages."""
