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


def test_every_subcommand_is_an_entry_point_in_scripts():
    import importlib

    for command, (module_name, _) in cli.COMMANDS.items():
        assert module_name.startswith("slonn.scripts."), f"{command}: {module_name} is not an entry point"
        assert callable(importlib.import_module(module_name).main), f"{command}: {module_name} has no main()"
