"""What stands before every route: the two key classes, rate limits, request size and content limits. Imports core and config."""
