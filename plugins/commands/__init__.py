"""Built-in `prism` commands beyond the core ones, each registered in COMMANDS."""
