"""CLI for the clean stage (placeholder until the stage lands)."""

COMMANDS: list = []
