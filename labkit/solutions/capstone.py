"""Reference solutions for notebooks/17_capstone.ipynb."""


def dominates(a, b):
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))
