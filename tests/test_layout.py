"""The package layout: components import as kaito.<folder>, and `operator` stays the standard library."""

import subprocess
import sys

from helpers import REPO


def test_components_import_under_kaito():
    import kaito.operator
    import kaito.presets
    import kaito.ragservice
    import kaito.runtime
    import kaito.tuning

    assert kaito.presets.__file__.startswith(str(REPO / "presets"))
    assert str(REPO / "operator") in list(kaito.operator.__path__)
    for mod in (kaito.runtime, kaito.tuning, kaito.ragservice):
        assert mod.__name__.startswith("kaito.")


def test_stdlib_operator_not_shadowed_from_repo_root():
    # `python -m ...` and `python -c ...` put the working directory first on sys.path.
    code = "import operator, sys; assert operator.__file__.startswith(sys.base_prefix), operator.__file__; print('ok')"
    for argv in (["-c", code], ["-m", "json.tool", "--help"]):
        done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    import kaito.operator  # noqa: F401
    import operator

    assert operator.__file__.startswith(sys.base_prefix)
    assert operator.eq(1, 1)


def test_package_data_is_shipped():
    from kaito.presets import catalogue

    assert len(list((catalogue.DATA_DIR / "models").glob("*.yaml"))) >= 24
    assert (catalogue.DATA_DIR / "gpus.yaml").is_file()
