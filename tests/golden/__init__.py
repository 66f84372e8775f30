"""Golden files the tests compare against, and the code that writes them (README.md here)."""
