"""The host adapters: one per host (verl/, trl.py, ...), thin, no formula of their own. See docs/design.md."""
