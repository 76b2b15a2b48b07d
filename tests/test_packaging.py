"""One package named dsreg: nothing generic at the top of site-packages, Alembic found through it."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_only_the_dsreg_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("dsreg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"dsreg", next(t for t in top if t.endswith(".dist-info"))}
    for module in ("dsreg/cli/main.py", "dsreg/migrations/env.py", "dsreg/migrations/script.py.mako", "dsreg/tables.py"):
        assert module in names
    assert any(n.startswith("dsreg/migrations/versions/0001") for n in names)


def test_alembic_scripts_are_found_through_the_package(tmp_path, monkeypatch):
    """A ``migrations`` package of another project first on sys.path changes nothing."""
    impostor = tmp_path / "migrations"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise ImportError('the wrong migrations package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from dsreg.migrate import alembic_config, head_revision

    assert Path(alembic_config().get_main_option("script_location")).resolve() == (ROOT / "migrations").resolve()
    assert head_revision() == sorted(p.name[:4] for p in (ROOT / "migrations" / "versions").glob("0*.py"))[-1]
