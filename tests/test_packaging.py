"""The installed package carries its presets and built-in images (no source tree needed)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "interclr_cli").rglob("__init__.py")}
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"


def test_wheel_contains_presets_and_builtin_data_and_runs_without_source_tree(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(ROOT),
            "-w",
            str(tmp_path / "w"),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "w").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("interclr_cli/presets/")}
    assert {p.name for p in (ROOT / "presets").glob("*.yaml")} <= shipped
    assert sum(n.startswith("interclr_cli/builtin/cifar10-mini/train/") and n.endswith(".jpg") for n in names) == 5000
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import interclr_cli, pathlib;"
        "assert str(pathlib.Path(interclr_cli.__file__)).startswith(sys.argv[1]);"
        "from interclr_cli.config import list_presets, load_config; from interclr_cli.config.loader import preset_dir;"
        "assert str(preset_dir()).startswith(sys.argv[1]); print(len(list_presets()), load_config('quickstart').data.root)"
    )
    res = subprocess.run([sys.executable, "-I", "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "builtin:cifar10-mini" in res.stdout
