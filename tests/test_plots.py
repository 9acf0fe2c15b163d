"""The SVG charts of the reports: ticks, points inside the plot area, markers, empty data."""

import re

from alignkit.plots import _ticks, chart


def test_ticks_are_round_and_cover_the_range():
    assert _ticks(0, 60) == [0, 20, 40, 60]
    assert _ticks(-0.7, 0.9) == [-0.5, 0.0, 0.5]
    assert _ticks(3, 3) == [3]


def test_chart_places_every_point_inside_the_plot_and_draws_markers():
    svg = chart([{"label": "gold", "x": [0, 5, 10], "y": [0.2, 0.5, float("nan")]},
                 {"label": "proxy", "x": [0, 5, 10], "y": [-1, 0, 1], "style": "points"}],
                title="t <1>", xlabel="x", ylabel="y", width=500, height=300, vlines=[{"x": 5, "label": "flag"}])
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "t &lt;1&gt;" in svg
    line = re.search(r'polyline points="([^"]+)"', svg).group(1).split()
    assert len(line) == 2  # the NaN point is left out
    for cx, cy in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg):
        assert 58 <= float(cx) <= 500 - 130 and 28 <= float(cy) <= 300 - 42
    assert "stroke-dasharray" in svg and ">flag<" in svg


def test_chart_without_data_says_so():
    assert "no data" in chart([], title="empty", xlabel="x", ylabel="y")


def test_a_long_legend_label_widens_the_chart_not_the_plot():
    short = chart([{"label": "a", "x": [0, 1], "y": [0, 1]}], title="t", xlabel="x", ylabel="y")
    long = chart([{"label": "a" * 40, "x": [0, 1], "y": [0, 1]}], title="t", xlabel="x", ylabel="y")
    width = int(re.search(r'width="(\d+)"', long).group(1))
    assert width >= 58 + (520 - 188) + 40 * 6 and 'width="520"' in short
    plot = re.compile(r'<rect x="58" y="28" width="(\d+)"')
    assert plot.search(short).group(1) == plot.search(long).group(1)
