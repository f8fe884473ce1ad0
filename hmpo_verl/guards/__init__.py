"""The runtime guards around verl's internals (each wrapped symbol listed in verl_symbols.py). See docs/design.md."""
