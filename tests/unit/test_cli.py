"""The `slonn` entry point hands each subcommand its arguments verbatim."""

from slonn.scripts import cli


def test_subcommand_argv_keeps_double_dash():
    argv = ["--log-level", "DEBUG", "compare", "--requests", "5", "--", "--precision", "fp32"]
    assert cli.subcommand_argv(argv, "compare") == ["--requests", "5", "--", "--precision", "fp32"]


def test_main_passes_double_dash_to_the_subcommand(monkeypatch):
    seen = {}

    class Module:
        @staticmethod
        def main(argv):
            seen["argv"] = argv
            return 0

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Module)
    assert cli.main(["compare", "--", "--precision", "fp32"]) == 0
    assert seen["argv"] == ["--", "--precision", "fp32"]
