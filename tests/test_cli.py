"""The command line, run in-process as a user would type it."""
import json
import re

import pytest

from deeproots.cli import main


def test_table_nin(capsys):
    assert main(["table", "nin"]) == 0
    out = capsys.readouterr().out
    assert "Table 8" in out and "26 of 26" in out and "NO" not in out


def test_table_json(capsys):
    assert main(["table", "googlenet", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["googlenet"]
    assert [r["model"] for r in rows][0] == "googlenet" and all(r["macs_match"] for r in rows)


def test_list_and_profile(capsys):
    assert main(["list", "nin-root*"]) == 0
    assert capsys.readouterr().out.split() == ["nin-root-2", "nin-root-4", "nin-root-8",
                                               "nin-root-16"]
    assert main(["profile", "resnet50-root-64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["macs"] == 2_114_859_008
    assert main(["profile", "nin", "--groups", "conv2a=8", "conv3a=4", "--per-layer"]) == 0
    assert "103,342,080" in capsys.readouterr().out


def test_profile_without_the_classifier(capsys):
    # --num-classes 0, timm's num_classes=0: resnet50 less its FC, by hand 2048 x 1000
    # multiply-adds and 2048 x 1000 + 1000 params
    assert main(["profile", "resnet50", "--num-classes", "0", "--json"]) == 0
    bare = json.loads(capsys.readouterr().out)
    assert main(["profile", "resnet50", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["macs"] - bare["macs"] == 2048 * 1000
    assert full["params"] - bare["params"] == 2048 * 1000 + 1000


def test_input_size_names_the_image_channels(capsys):
    """``--input-size 1,28,28`` builds the model for one channel, as timm's scripts read it
    (it was refused: "Build it with in_channels=1", advice for Python): resnet50's stem
    loses 2 input channels of 64 7x7 filters, by hand 64 x 2 x 49 weights and, at 14x14,
    as many multiply-adds a pixel; disagreeing with --in-channels is one line."""
    assert main(["profile", "resnet50", "--input-size", "1,28,28", "--json"]) == 0
    gray = json.loads(capsys.readouterr().out)
    assert main(["profile", "resnet50", "--input-size", "3,28,28", "--json"]) == 0
    rgb = json.loads(capsys.readouterr().out)
    assert rgb["params"] - gray["params"] == 64 * 2 * 49
    assert rgb["macs"] - gray["macs"] == 64 * 2 * 49 * 14 * 14
    assert main(["profile", "resnet50", "--input-size", "1,28,28", "--in-channels", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "deeproots profile: error: --in-channels 3 and --input-size 1,28,28 disagree on the "
        "image channels: give one of them, or the same C in both")


def test_deeproots_alone_lists_its_commands(capsys):
    """`deeproots` with nothing after it: the commands and what each does, exit 0 (it was
    argparse's "the following arguments are required: COMMAND", exit 2)."""
    from deeproots.cli import COMMAND_PARSERS

    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: deeproots")
    listed = {line.split()[0] for line in out.splitlines()  # a command's line: 4 spaces in
              if line.startswith("    ") and not line.startswith("     ")}
    assert listed == {p.__name__[len("_parser_"):].replace("_", "-") for p in COMMAND_PARSERS}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "nin-rot-8"], "unknown model 'nin-rot-8'"),
        (["profile", "nin", "--groups", "conv2a=5"], "5 groups do not divide"),
        (["profile", "nin", "--groups", "conv2a"], "LAYER=GROUPS"),
        (["profile", "nin", "--input-size", "2"], "at least 4"),
    ],
)
def test_errors_are_one_clear_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_fine_tunes_defaults_are_its_optimizers():
    """train --init: 1 epoch by AdamW (SGD if asked) at the optimizer's fine-tune rate (3e-4
    with AdamW, 0.01 with SGD) unless --lr is given; a training from scratch leaves the
    optimizer to the run (SGD) and lr to it (the optimizer's default)."""
    from deeproots.cli import _train_settings, build_parser

    def settings(*argv):
        return _train_settings(build_parser().parse_args(["train", *argv]))

    tune = settings("--init", "c.pt")
    assert (tune["opt"], tune["lr"], tune["epochs"]) == ("adamw", 3e-4, 1)
    assert (settings("--init", "c.pt", "--opt", "sgd")["lr"]) == 0.01
    assert settings("--init", "c.pt", "--lr", "1e-4")["lr"] == 1e-4
    assert "lr" not in settings("nin", "--opt", "adamw") and "opt" not in settings("nin")


def test_groups_given_twice_are_both_applied(capsys):
    assert main(["profile", "nin", "--groups", "conv2a=8", "--groups", "conv3a=4",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["macs"] == 103_342_080  # nin-root-8's: both overrides applied (Table 8)


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from deeproots.cli import main\n"
            "try: main(['train', '--help'])\n"
            "except SystemExit: pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().endswith("False") and "--resume" in done.stdout


def test_a_conversions_progress_lines_carry_the_seconds_since_the_command_started(capsys):
    """rootify's progress lines ("... conv2a: ...") say when each step ended, so that where a
    conversion's minutes go can be read off them."""
    import time

    import deeproots.cli as cli

    cli._STARTED[0] = time.perf_counter() - 12.34
    cli._say("conv2a: 2 groups +0.40")
    assert re.fullmatch(r"\.\.\.   12\.[34] s  conv2a: 2 groups \+0\.40\n",
                        capsys.readouterr().err)
