"""The OpenAPI document of the main service, built from the wire schemas of every API, and its serving. Imports the domain packages below it."""
