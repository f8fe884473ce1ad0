"""The maths: pure torch, no host import (tests/test_house.py checks it). See docs/design.md."""
