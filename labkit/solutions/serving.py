"""Reference solutions for notebooks/16_serving.ipynb."""

import math


def accept_draft(guesses, target):
    kept = []
    for guess, choice in zip(guesses, target):
        if guess != choice:
            break
        kept.append(guess)
    kept.append(target[len(kept)])  # the target's own token: a correction, or the bonus after k hits
    return kept


def percentile(values, q):
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)
