"""README.md opens with the two commands, and .ci/run runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_opens_with_main_job_and_test_commands():
    main_job, tests = readme_commands()
    assert "--no-build-isolation -e ." in main_job and "examples/swa_tutorial.py" in main_job
    assert "dataset-fashion-mnist" in main_job  # the data the main job reads ships as a Debian package
    assert "--no-build-isolation -e ." in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = readme_commands()
    assert f"TEST_COMMAND='{tests}'" in (ROOT / ".ci" / "run").read_text()
