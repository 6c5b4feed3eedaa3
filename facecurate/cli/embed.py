"""CLI for the embed stage (placeholder until the stage lands)."""

COMMANDS: list = []
