"""CLI for the align stage (placeholder until the stage lands)."""

COMMANDS: list = []
