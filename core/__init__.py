"""Shared ground of both programs: errors and their one mapping, request context, client disconnects, wire-model base classes. Imports only config and libraries."""
