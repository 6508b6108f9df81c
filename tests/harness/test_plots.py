"""headguard.plots: valid PNGs with one titled panel per series, marked gaps for non-finite values, clear errors for
bad arguments and for a missing matplotlib (the optional extra)."""

from __future__ import annotations

import math
import sys

import pytest

from headguard import plots

matplotlib = pytest.importorskip("matplotlib")  # the `test` extra installs it

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVES = {"box_loss": [3.0, 2.5, math.nan, 1.9, 1.5], "grad_norm": [10.0, 8.0, math.inf, 6.0, 5.5]}


def test_writes_a_png_matplotlib_reads_back(tmp_path):
    from matplotlib.image import imread

    path = plots.write_curves(tmp_path / "sub" / "canary.png", CURVES, title="canary", dpi=50)
    assert path == tmp_path / "sub" / "canary.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape
    assert float(pixels.std()) > 0, "the image is blank"


def test_png_text_names_the_title_and_every_series(tmp_path):
    from PIL import Image  # matplotlib's own image dependency

    path = plots.write_curves(tmp_path / "c.png", CURVES, title="R0 story", dpi=40)
    with Image.open(path) as image:
        text = dict(image.text)
    assert text["Title"] == "R0 story"
    assert text["Description"] == "series: box_loss, grad_norm"


def test_one_panel_per_series_titled_with_its_name():
    figure = plots.curves_figure(CURVES, title="t", xlabel="iteration")
    titles = [ax.get_title(loc="left") for ax in figure.axes]
    assert titles == ["box_loss", "grad_norm"]
    assert figure.axes[-1].get_xlabel() == "iteration"
    assert figure.get_suptitle() == "t"


def test_nonfinite_values_are_gaps_with_a_marker_naming_the_steps():
    figure = plots.curves_figure({"loss": [1.0, math.nan, math.inf, 0.5], "ok": [1.0, 2.0]}, title="t")
    loss_ax, ok_ax = figure.axes
    line = loss_ax.get_lines()[0]
    drawn = list(line.get_ydata())
    assert drawn[0] == 1.0 and drawn[3] == 0.5 and all(math.isnan(v) for v in drawn[1:3]), drawn
    legend = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert legend == ["non-finite (gap) at steps 1, 2"], legend
    assert ok_ax.get_legend() is None


def test_log_scale_only_for_named_series():
    figure = plots.curves_figure(CURVES, title="t", log_scale={"grad_norm"})
    assert [ax.get_yscale() for ax in figure.axes] == ["linear", "log"]


def test_no_global_matplotlib_state_changes(tmp_path):
    backend = matplotlib.get_backend()
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    plots.write_curves(tmp_path / "c.png", CURVES, title="t", dpi=30)
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded


@pytest.mark.parametrize(
    ("curves", "error", "fragment"),
    [
        ({}, ValueError, "at least one series in curves"),
        ([1.0, 2.0], TypeError, "mapping of series name -> values for curves, got type=list"),
        ({"loss": []}, ValueError, "at least one value in curves['loss']"),
        ({"loss": "1234"}, TypeError, "sequence of numbers for curves['loss'], got type=str"),
        ({"loss": 3.0}, TypeError, "sequence of numbers for curves['loss'], got type=float"),
        ({"loss": [1.0, "2"]}, TypeError, "real number at curves['loss'][1], got '2'"),
        ({"loss": [1.0, None]}, TypeError, "real number at curves['loss'][1], got None"),
        ({"skipped": [False, True]}, TypeError, "real number at curves['skipped'][0], got False (type=bool)"),
        ({"": [1.0]}, TypeError, "non-empty str for every series name"),
        ({3: [1.0]}, TypeError, "non-empty str for every series name in curves, got 3"),
    ],
)
def test_bad_curves_raise_naming_what_was_wrong(tmp_path, curves, error, fragment):
    with pytest.raises(error) as info:
        plots.write_curves(tmp_path / "c.png", curves, title="t")
    assert fragment in str(info.value)
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"path": "curves.pdf"}, ValueError, "ending in .png"),
        ({"path": 3}, TypeError, "str or os.PathLike for path, got path=3"),
        ({"title": None}, TypeError, "Expected str for title, got title=None"),
        ({"xlabel": 1}, TypeError, "Expected str for xlabel"),
        ({"dpi": 0}, ValueError, "int dpi > 0, got dpi=0"),
        ({"log_scale": "loss"}, TypeError, "collection of series names for log_scale"),
        ({"log_scale": ["lr"]}, ValueError, "unknown ['lr']"),
        ({"log_scale": ["loss"], "curves": {"loss": [1.0, 0.0]}}, ValueError, "got 0.0 at step 1"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(tmp_path, kwargs, error, fragment):
    arguments = {"path": tmp_path / "c.png", "curves": {"loss": [1.0, 2.0]}, "title": "t", **kwargs}
    with pytest.raises(error) as info:
        plots.write_curves(**arguments)
    assert fragment in str(info.value)


def test_sequences_of_any_real_numbers_are_accepted(tmp_path):
    numpy = pytest.importorskip("numpy")
    curves = {"ints": (1, 2, 3), "numpy": list(numpy.array([0.5, 0.25], dtype=numpy.float32))}
    assert plots.write_curves(tmp_path / "c.png", curves, title="t", dpi=30).exists()


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(plots.PlotsUnavailableError) as info:
        plots.write_curves(tmp_path / "c.png", {"loss": [1.0]}, title="t")
    assert "pip install 'headguard[plots]'" in str(info.value)
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "c.png").exists()


# --- the face: headguard check --plots DIR -----------------------------------------------------------------------------

def test_check_plots_writes_the_canary_png_and_every_report_names_it(tmp_path, capsys):
    import json
    import xml.etree.ElementTree as ET

    from matplotlib import image

    from headguard.cli import main

    jpath, xpath, out_dir = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "plots"
    code = main(["check", "heads:Detect", "--select", "check_training_canary", "--profile", "ci",
                 "--plots", str(out_dir), "--json", str(jpath), "--junit", str(xpath)])
    out = capsys.readouterr().out
    assert code == 0, out
    (png,) = out_dir.iterdir()
    assert png.name == "heads_Detect-check_training_canary-canary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.imread(png).ndim == 3
    assert f"heads:Detect::check_training_canary: {png}" in out
    (record,) = [r for r in json.loads(jpath.read_text())["results"] if r["name"] == "check_training_canary"]
    assert record["artifacts"] == [str(png)] and len(record["series"]["canary"]["grad_norm"]) == 30
    plotted = [p.get("value") for p in ET.parse(xpath).iter("property") if p.get("name") == "plot"]
    assert plotted == [str(png)]


def test_check_plots_without_matplotlib_is_a_usage_error_before_the_run(tmp_path, capsys, monkeypatch):
    from headguard.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["check", "heads:Detect", "--plots", str(tmp_path / "plots")])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.splitlines()) == 1 and plots.INSTALL_HINT in err
