"""A slider panel that reruns an experiment and redraws one matplotlib figure.

    explore(experiment, seq_len=(16, 512, 16), batch=[1, 4, 16])

``experiment(fig, **values)`` draws into ``fig`` (a fresh figure each time) and may
return text to print under it. Each parameter is ``(min, max, step)`` for an integer
slider, ``(min, max, step)`` with floats for a float slider, a list of options for a
dropdown, or a bool for a checkbox; the first value (or ``default=``) is the default.

Under nbval, or anywhere without ipywidgets and a live kernel, the panel runs the
experiment once with the defaults and shows the figure: a notebook stays testable, and
its output says which values it used. Set ``LABKIT_STATIC=1`` to force that mode.
"""

from __future__ import annotations

import decimal
import os
from collections.abc import Callable

import matplotlib.pyplot as plt


def _default(spec):
    if isinstance(spec, bool):
        return spec
    if isinstance(spec, tuple) and len(spec) == 4:
        return spec[3]
    if isinstance(spec, tuple):
        return spec[0]
    if isinstance(spec, list):
        return spec[0]
    raise ValueError(f"a parameter must be (min, max, step[, default]), a list of options or a bool, got {spec!r}")


def static_mode() -> bool:
    """True when widgets cannot (or should not) be live: tests, scripts, no ipywidgets."""
    if os.environ.get("LABKIT_STATIC") == "1":
        return True
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return True
    shell = get_ipython()
    return shell is None or not hasattr(shell, "kernel")


def _widget(name: str, spec):
    import ipywidgets as w

    style = {"description_width": "initial"}
    if isinstance(spec, bool):
        return w.Checkbox(value=spec, description=name, style=style)
    if isinstance(spec, list):
        return w.Dropdown(options=spec, value=spec[0], description=name, style=style)
    lo, hi, step = spec[:3]
    value = _default(spec)
    if all(isinstance(v, int) for v in (lo, hi, step)):
        return w.IntSlider(
            min=lo, max=hi, step=step, value=value, description=name, continuous_update=False, style=style
        )
    decimals = max(2, -decimal.Decimal(str(step)).normalize().as_tuple().exponent)  # show every step: 0.995, 0.625
    return w.FloatSlider(min=lo, max=hi, step=step, value=value, description=name, continuous_update=False, style=style,
                         readout_format=f".{decimals}f")  # fmt: skip


def _run(experiment: Callable, figsize, values: dict) -> None:
    fig = plt.figure(figsize=figsize)
    text = experiment(fig, **values)
    if text:
        print(text)
    plt.show()


def explore(experiment: Callable, figsize=(7, 3.5), **params) -> None:
    """Show sliders for ``params`` and redraw ``experiment`` whenever one moves."""
    if not params:
        raise ValueError("explore needs at least one parameter, e.g. seq_len=(16, 512, 16)")
    defaults = {name: _default(spec) for name, spec in params.items()}
    if static_mode():
        print("static run with defaults: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
        _run(experiment, figsize, defaults)
        return
    import ipywidgets as w
    from IPython.display import display

    controls = {name: _widget(name, spec) for name, spec in params.items()}
    output = w.interactive_output(lambda **values: _run(experiment, figsize, values), controls)
    display(w.VBox([w.HBox(list(controls.values())), output]))
