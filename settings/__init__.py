"""The pieces of config.py's settings loader: the [section] models and the parsers of single settings. Imports only libraries; config.py (settings and MODEL_MAPPING) imports these."""
