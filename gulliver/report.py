"""
The pieces analyze.py builds its report from: figures written into the report folder, markdown
for report.md (tables, tokens, the line that shows a figure) and plain values for report.json.
A figure is shown by a line ![name](name) of its own, so the figures of a report are the ones
its markdown shows (figures_shown), in the order it shows them.
"""
import math
import os
import re

import numpy as np
import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from gulliver.atomic import write_atomic  # noqa: E402


def image(name):
    """The markdown that shows the figure file name (in the same folder as report.md)."""
    return f'![{name}]({name})\n'


def figures_shown(md):
    """The file names of the figures that the markdown lines md show, in order."""
    return re.findall(r'^!\[(.+?)\]\(', '\n'.join(md), re.MULTILINE)


def save(fig, report_dir, name):
    """Write a figure into report_dir (atomically); return the markdown that shows it."""
    write_atomic({os.path.join(report_dir, name): lambda tmp: fig.savefig(tmp, format='png', dpi=110)})
    plt.close(fig)
    return image(name)


def plot_lines(report_dir, name, title, xlabel, ylabel, lines, **axes):
    """A figure of curves, lines = [(x, y, style, label or None), ...]; returns its markdown."""
    fig, ax = plt.subplots(figsize=(6.5, 4), layout='constrained')
    for x, y, style, label in lines:
        ax.plot(x, y, style, ms=3, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **axes)
    if any(label for *_, label in lines):
        ax.legend()
    return save(fig, report_dir, name)


def heatmap(ax, fig, M, title, xlabels, ylabels, label, **imshow):
    """An annotated matrix with its colour bar."""
    im = ax.imshow(M, aspect='auto', **imshow)
    fig.colorbar(im, ax=ax, label=label)
    ax.set(title=title, xticks=range(len(xlabels)), yticks=range(len(ylabels)), yticklabels=ylabels)
    ax.set_xticklabels(xlabels, rotation=30, ha='right')
    for (i, j), v in np.ndenumerate(M):
        r, g, b, _ = im.cmap(im.norm(v))  # dark text on light cells, light text on dark ones
        ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=8,
                color='k' if r + 2 * g + b > 2 else 'w')


def table(header, rows):
    """A markdown table; floats to 4 significant digits."""
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] +
                     ['| ' + ' | '.join(f'{c:.4g}' if isinstance(c, float) else str(c) for c in row) + ' |'
                      for row in rows]) + '\n'


def show(token):
    """A token in markdown: quoted, with newlines and table bars escaped."""
    return '`' + repr(token).replace('|', '\\|').replace('`', "'") + '`'


def plain(o):
    """report.json values: numpy to lists and numbers, NaN and inf to None (JSON has neither)."""
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [plain(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return int(o) if isinstance(o, np.integer) else o
