"""Everything that draws on the terminal: rich rendering and the REPL."""
