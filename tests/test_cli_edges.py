"""The edges of the command line a user touches first: start-up cost, --version, the defaults
shown in --help, --quiet, and the fixed-wording reason given for DICOM pixel data that no installed
codec decodes."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

import medmeta
from medmeta.cli.main import app
from medmeta.progress import console, error_console, is_quiet, make_progress, set_quiet

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "adapt", "evaluate", "calibrate")
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
runner = CliRunner()


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture(autouse=True)
def _loud_again():
    """--quiet is process-wide state on the shared console: never leak it into other tests."""
    yield
    set_quiet(False)


# -- start-up ----------------------------------------------------------------------------------
_IMPORT_PROBE = textwrap.dedent(
    """
    import json, sys, traceback

    HEAVY = ("torch", "monai")
    first = {}

    class Spy:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in HEAVY and top not in first:
                first[top] = [
                    f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                    if "importlib" not in f.filename
                ]
            return None

    sys.meta_path.insert(0, Spy())
    import medmeta.cli.main  # noqa: F401
    print(json.dumps({"loaded": [m for m in HEAVY if m in sys.modules], "first": first}))
    """
)


def test_cli_import_is_light():
    """``medmeta --help`` and argument errors must answer at once: importing the command line
    (main, common and the four command modules) loads neither torch nor MONAI."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    chains = {name: "\n    ".join(stack) for name, stack in report["first"].items()}
    assert report["loaded"] == [], "imported at start-up by:\n" + "\n".join(f"{k}:\n    {v}" for k, v in chains.items())


# -- --version ---------------------------------------------------------------------------------
def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"medmeta {medmeta.__version__}"


def test_version_is_written_in_one_place():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "medmeta.__version__"' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+(\S*)", medmeta.__version__)


# -- defaults in --help ------------------------------------------------------------------------
def _options_shown(help_text: str) -> dict[str, str]:
    """``--option`` -> its whole row of the options list (continuation lines included)."""
    rows: dict[str, str] = {}
    current = None
    for line in plain(help_text).splitlines():
        start = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if start:
            current = start.group(1)
            rows[current] = line
        elif current and line.startswith("      "):
            rows[current] += " " + line.strip()
        else:
            current = None
    return rows


def _options_with_a_default(command) -> list[str]:
    """Options of a Click command that have a default: a value, an off flag or a written
    ``[default: ...]`` (``--help`` and ``--version`` are actions, not settings)."""
    names = []
    for param in command.params:
        if not isinstance(param, TyperOption) or param.is_eager:
            continue
        written = "[default:" in (param.help or "")
        if param.default is not None or written:
            names.append(param.opts[0])
    return names


@pytest.mark.parametrize("name", COMMANDS)
def test_every_default_is_shown_in_help(name):
    command = typer.main.get_command(app).get_command(None, name)
    expected = _options_with_a_default(command)
    assert expected, f"{name} has no option with a default?"
    result = runner.invoke(app, [name, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = _options_shown(result.output)
    missing = [option for option in expected if "default:" not in rows.get(option, "")]
    assert not missing, f"medmeta {name} --help shows no default for {missing}:\n{plain(result.output)}"


def test_written_defaults_keep_their_words():
    """Hand-written ``[default: protocol's]`` is shown as written, not taken for Rich markup."""
    command = typer.main.get_command(app).get_command(None, "train")
    written = {p.opts[0]: re.search(r"\[default:[^\]]*\]", p.help).group(0) for p in command.params if "[default:" in (p.help or "")}
    assert written
    rows = _options_shown(runner.invoke(app, ["train", "--help"], env=WIDE).output)
    for option, text in written.items():
        assert text in re.sub(r"\s+", " ", rows[option]), option


def test_group_help_shows_the_global_options_and_commands():
    result = runner.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    rows = _options_shown(text)
    assert "--version" in rows and "[default: off]" in rows["--quiet"]
    for name in COMMANDS:
        assert re.search(rf"^  {name}\s+\S", text, flags=re.M), name


# -- --quiet -----------------------------------------------------------------------------------
def test_quiet_still_prints_errors(tmp_path):
    missing = tmp_path / "missing"
    result = runner.invoke(app, ["--quiet", "evaluate", "--checkpoint", str(missing)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "missing" in result.output
    assert is_quiet()


def _probe_app() -> typer.Typer:
    """medmeta's global options (its callback) over one command that prints information and then
    fails as a user error, independent of what the real commands do."""
    from medmeta.cli.common import user_errors
    from medmeta.cli.main import _main
    from medmeta.errors import MedmetaError

    probe = typer.Typer()
    probe.callback()(_main)

    @probe.command()
    def fail() -> None:
        console.print("an information line")
        with user_errors():
            raise MedmetaError("scan.dcm: unreadable")

    return probe


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_hides_information_but_not_errors(quiet):
    result = runner.invoke(_probe_app(), ["--quiet", "fail"] if quiet else ["fail"])
    assert result.exit_code == 2, result.output
    assert "error: scan.dcm: unreadable" in plain(result.output)
    assert ("an information line" in result.output) is not quiet


def test_without_quiet_the_console_is_loud_again():
    """--quiet is set (or unset) on every invocation, so an earlier --quiet never lingers."""
    set_quiet(True)
    result = runner.invoke(_probe_app(), ["fail"])
    assert result.exit_code == 2
    assert "an information line" in result.output
    assert not is_quiet()


def test_quiet_silences_progress_and_info_but_not_errors(capsys):
    set_quiet(True)
    assert make_progress().disable
    with make_progress() as progress:
        task = progress.add_task("episodes", total=3, status="")
        progress.advance(task, 3)
    console.print("an information line")
    error_console.print("an error line")
    set_quiet(False)
    assert not make_progress().disable
    err = capsys.readouterr().err
    assert "an error line" in err
    assert "information" not in err and "episodes" not in err


def test_errors_are_not_read_as_markup():
    from medmeta.cli.common import user_errors
    from medmeta.errors import ScanReadError

    set_quiet(True)
    with pytest.raises(typer.Exit) as exit_info:
        with error_console.capture() as captured:
            with user_errors():
                raise ScanReadError("scans/[bold]case.dcm", "bad [default: x] value")
    assert exit_info.value.exit_code == 2
    assert "scans/[bold]case.dcm: bad [default: x] value" in captured.get()


def test_warnings_survive_quiet():
    from medmeta.cli.common import warn

    set_quiet(True)
    with error_console.capture() as captured:
        warn("shot 1 differs from the calibrated shot [5]")
    assert "warning shot 1 differs from the calibrated shot [5]" in captured.get()


# -- decode errors -----------------------------------------------------------------------------
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def _jpeg_ls_decodable() -> str | None:
    """The pydicom plugins that decode JPEG-LS here, if any (then the missing-codec error cannot
    occur); the fixture ``without_pyjpegls`` hides the one highdicom brings."""
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    return ", ".join(JPEGLSLosslessDecoder._available) or None


def write_jpeg_ls_dicom(path: Path) -> Path:
    """A DICOM whose pixel data is encapsulated JPEG-LS (the bytes need not decode: with no
    JPEG-LS codec installed, pydicom refuses before looking at them)."""
    import numpy as np
    from pydicom.encaps import encapsulate
    from test_reading import write_dicom

    frame = b"\xff\xd8\xff\xf7" + bytes(range(64)) + b"\xff\xd9"
    return write_dicom(path, np.zeros((8, 8)), transfer_syntax=JPEG_LS_LOSSLESS, bits_stored=12, pixel_data=encapsulate([frame]))


def _bundled_pydicom_file(name: str) -> Path:
    """A test file shipped inside the pydicom package (never downloaded)."""
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped with this pydicom version (not downloaded on purpose)")
    return path


@pytest.mark.parametrize("source", ["written", "pydicom"])
def test_missing_dicom_codec_reason_is_fixed_wording_and_names_the_extra(source, tmp_path, without_pyjpegls):
    from medmeta.data.reading import Preprocessing, ScanReader
    from medmeta.errors import ScanReadError

    installed = _jpeg_ls_decodable()
    if installed:
        pytest.skip(f"{installed} is installed, so JPEG-LS decodes and the missing-codec reason cannot be produced")
    if source == "written":
        path = write_jpeg_ls_dicom(tmp_path / "jpeg ls.dcm")
    else:
        path = _bundled_pydicom_file("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(ScanReadError) as excinfo:
        ScanReader(Preprocessing(image_size=16, channels=1))(path)
    reason = excinfo.value.reason
    assert "\n" not in str(excinfo.value) and "\t" not in reason
    # the transfer syntax is named from pydicom's UID dictionary, not from the file
    assert reason == (
        "compressed pixel data in JPEG-LS Lossless Image Compression that no installed codec can decode"
        ' (the DICOM pixel-data codecs are not installed: pip install "medmeta[dicom-codecs]")'
    )


def test_codec_hint_only_for_compressed_transfer_syntaxes_pydicom_knows():
    from medmeta.data.reading import _codec_hint

    extra_installed = all(importlib.util.find_spec(module) for module in ("pylibjpeg", "libjpeg", "openjpeg"))
    hint = ' (the DICOM pixel-data codecs are not installed: pip install "medmeta[dicom-codecs]")'
    assert _codec_hint(JPEG_LS_LOSSLESS) == ("" if extra_installed else hint)
    assert _codec_hint("1.2.840.10008.1.2.1") == ""  # Explicit VR Little Endian: not compressed
    assert _codec_hint("1.2.826.0.1.3680043.999") == ""  # unknown: the extra would not help


def test_dicom_codecs_extra_is_optional():
    pyproject = (REPO / "pyproject.toml").read_text()
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    codecs_line = next(line for line in extras.splitlines() if line.startswith("dicom-codecs"))
    for package in ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"):
        assert f'"{package}' in codecs_line
    required = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "pylibjpeg" not in required



# -- installation ------------------------------------------------------------------------------
def _readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_ci_runs_the_readme_test_command_verbatim():
    commands = _readme_commands()
    test_command = next(c for c in commands if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_command


def test_readme_quick_start_installs_what_pyproject_allows():
    """The pinned torch of the quick start satisfies pyproject's floor, and the floor is the one
    MONAI needs (a lower floor only lets pip replace a user's CUDA build)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([\d.]+)"', pyproject).group(1)
    pins = {re.search(r"pip install torch==([\d.]+)", c).group(1) for c in _readme_commands()}
    assert len(pins) == 1
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(pins.pop()) >= as_tuple(floor)
    assert "download.pytorch.org/whl/cpu" in (REPO / "README.md").read_text()
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
