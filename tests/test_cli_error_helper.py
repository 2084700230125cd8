"""jedi_common.errors' shared console-script rule: user errors and disk trouble -> one line on stderr and
exit 2; anything else -> the original exception (and traceback), unchanged."""
import errno
import traceback

import pytest

from jedi_common.errors import cli_errors, one_line, report_error


class Oops(Exception):
    pass


def full_disk(path="/data/out/shard-0.tar"):
    return OSError(errno.ENOSPC, "No space left on device", path)


def test_a_user_error_is_one_collapsed_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as ex, cli_errors("jedi-x", "--out", (Oops,)):
        raise Oops("bad   value\n  for --refs:\tuse a,b")
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err == "jedi-x: error: bad value for --refs: use a,b\n"


def test_an_unlisted_exception_is_reraised_unchanged(capsys):
    boom = KeyError("model.unet")
    with pytest.raises(KeyError) as ex, cli_errors("jedi-x", "--out", (Oops, ValueError)):
        raise boom
    assert ex.value is boom
    # the traceback still ends where it was raised, not in the helper
    assert traceback.extract_tb(ex.value.__traceback__)[-1].name == test_an_unlisted_exception_is_reraised_unchanged.__name__
    assert capsys.readouterr().err == ""
    assert one_line(boom, "--out", (Oops,)) is None
    assert report_error(boom, "jedi-x", "--out", (Oops,)) is False and capsys.readouterr().err == ""


def test_a_subclass_of_a_user_error_counts_but_its_base_does_not():
    assert one_line(FileNotFoundError(2, "No such file", "ref.png"), "--out", (FileNotFoundError,)) is not None
    assert one_line(OSError("generic"), "--out", (FileNotFoundError,)) is None


def test_a_full_disk_names_the_file_and_where_even_when_wrapped(capsys):
    with pytest.raises(SystemExit) as ex, cli_errors("jedi-synth", "out_dir"):  # no user errors: still a line
        try:
            raise full_disk()
        except OSError as e:
            raise RuntimeError("Error in call to target 'writer'") from e
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jedi-synth: error: cannot write /data/out/shard-0.tar: the disk is full")
    assert "set out_dir to another disk" in err and err.count("\n") == 1


def test_the_disk_line_wins_over_the_user_error_text():
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/run")
        except OSError as e:
            raise Oops("could not stage /ro/run") from e
    except Oops as e:
        line = one_line(e, "paths.output_dir", (Oops,))
    assert "read-only" in line and "paths.output_dir" in line and "could not stage" not in line


def test_explain_comes_first_and_none_falls_through():
    seen = []

    def explain(e):
        seen.append(e)
        return "output_dir is required;\n  give output_dir=<value>" if isinstance(e, Oops) else None

    # explain wins even over a disk error and over the user-error text
    disk = full_disk()
    assert one_line(disk, "out_dir", explain=lambda e: "explained") == "explained"
    assert one_line(Oops("raw text"), "out_dir", (Oops,), explain) == "output_dir is required; give output_dir=<value>"
    # explain passes (None): the disk line, then the user-error text, then nothing
    assert "the disk is full" in one_line(disk, "out_dir", explain=explain)
    assert one_line(ValueError("bad"), "out_dir", (ValueError,), explain) == "bad"
    assert one_line(KeyError("k"), "out_dir", (ValueError,), explain) is None
    assert len(seen) == 4


def test_explain_may_return_the_exception_behind(capsys):
    cause = ValueError("data.batch_size=0 must be\n1 or more")

    def behind(e):  # like jedi-train's user_error: the ValueError Hydra wrapped
        return e.__cause__ if isinstance(e.__cause__, ValueError) else None

    wrapper = RuntimeError("InstantiationException")
    wrapper.__cause__ = cause
    assert report_error(wrapper, "jedi-train", "paths.output_dir", explain=behind) is True
    assert capsys.readouterr().err == "jedi-train: error: data.batch_size=0 must be 1 or more\n"


def test_no_error_no_output(capsys):
    with cli_errors("jedi-x", "--out", (Oops,)):
        x = 1
    assert x == 1 and capsys.readouterr().err == ""


def test_system_exit_and_keyboard_interrupt_pass_through(capsys):
    with pytest.raises(SystemExit) as ex, cli_errors("jedi-x", "--out", (Oops,)):
        raise SystemExit(3)
    assert ex.value.code == 3
    with pytest.raises(KeyboardInterrupt), cli_errors("jedi-x", "--out", (Oops,)):
        raise KeyboardInterrupt
    assert capsys.readouterr().err == ""
