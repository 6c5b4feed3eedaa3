"""CLI for the pack stage (placeholder until the stage lands)."""

COMMANDS: list = []
