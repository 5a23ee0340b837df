"""`python -m whisperServer`: runs the whisper service."""

from whisperServer.service import main

main()
