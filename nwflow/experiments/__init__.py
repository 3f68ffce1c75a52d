"""Command-line entry points for the scaled runs; each writes ``book/results/*.json`` with provenance."""
