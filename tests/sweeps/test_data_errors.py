"""A launch's report of data it could not prepare (issue 24, point 4): every problem in full up to
sweeps.summary.DATA_PROBLEMS_SHOWN, then "and N more" naming a file that holds the whole list."""

from __future__ import annotations

import io

from calib.data.errors import DataError, Problem, error_from_problems
from sweeps.launch_sweep import report_data_errors
from sweeps.summary import DATA_PROBLEMS_SHOWN


def _problems(n: int) -> list[Problem]:
    # long entries: a cut by characters would stop mid-entry after a few of them
    return [Problem(f"case_{i:03d}", f"/data/renamed_predictions/case_{i:03d}.nii.gz", "missing_modality",
                    f"no label labels/case_{i:03d}.nii.gz matches this prediction (looked for the same case id)")
            for i in range(n)]


def test_a_long_problem_list_is_printed_entry_by_entry_and_written_whole(tmp_path):
    n = DATA_PROBLEMS_SHOWN + 7
    problems = _problems(n)
    err = io.StringIO()
    reasons = report_data_errors({"mynet": error_from_problems(problems, "predictions /data/renamed")},
                                 tmp_path / "data_errors", "abcd1234", err)
    lines = err.getvalue().splitlines()
    assert lines[0] == f"error: data of mynet: predictions /data/renamed: {n} problems:"
    assert lines[1:1 + DATA_PROBLEMS_SHOWN] == [f"  {p}" for p in problems[:DATA_PROBLEMS_SHOWN]]  # whole
    listed = tmp_path / "data_errors" / "mynet-abcd1234.txt"
    assert lines[-1] == f"  and 7 more: every problem is in {listed}"
    assert len(lines) == DATA_PROBLEMS_SHOWN + 2
    written = listed.read_text().splitlines()
    assert written[1:] == [str(p) for p in problems]  # every one, also those calib's message left out
    assert reasons == {"mynet": f"predictions /data/renamed: {n} problems (the problems are printed above)"}


def test_a_short_list_is_printed_whole_and_no_file_is_written(tmp_path):
    problems = _problems(3)
    err = io.StringIO()
    folder = tmp_path / "data_errors"
    report_data_errors({"mynet": error_from_problems(problems, "predictions /p"),
                        "brats18": DataError("dataset /d: no subject found\nlooked under HGG/ and LGG/")},
                       folder, "abcd1234", err)
    lines = err.getvalue().splitlines()
    assert lines == ["error: data of mynet: predictions /p: 3 problems:", *[f"  {p}" for p in problems],
                     "error: data of brats18: dataset /d: no subject found", "  looked under HGG/ and LGG/"]
    assert not folder.exists()
