"""The main service's side of speech to text: /v1/audio forwarded to the whisper service, and its wire schemas. Imports observe, guard, upstream, core and config."""
