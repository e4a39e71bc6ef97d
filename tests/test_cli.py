"""The command line: `sb-keras list` and `sb-keras table`."""

import subprocess
import sys

import sb_keras
from sb_keras import cli


def test_list(capsys):
    assert cli.main(["list", "resnet56_s16*"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [
        "resnet56_s16u0_double",
        "resnet56_s16u1",
        "resnet56_s16u1_double",
    ]


def test_table(capsys):
    assert cli.main(["table", "resnet20_s8u1"]) == 0
    out = capsys.readouterr().out
    params = sb_keras.count_params(sb_keras.get_model("resnet20_s8u1"))
    assert f"| resnet20_s8u1 | {params:,} |" in out
    assert "| resnet20 | 269,722 |" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert cli.main(["table", "resnet57"]) == 2
    assert "name='resnet57'" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "sb_keras", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    assert out.stdout.strip() == sb_keras.__version__
