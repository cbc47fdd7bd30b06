"""Reference solutions to the notebooks' exercises. Try first; then compare."""
