"""Command-line interfaces: the click commands and the orchestrator/monitor they drive."""
