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


def test_sharded_section_quotes_the_example_that_runs():
    """README's "Sharded and offloaded averages" code is the marked middle of
    examples/sharded_average.py (which tests/test_sharded_average.py's example test runs)."""
    import textwrap

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Sharded and offloaded averages"):]
    quoted = re.search(r"```python\n(.+?)```", section, re.S).group(1)
    example = (ROOT / "examples" / "sharded_average.py").read_text()
    start = example.index("# --- README: Sharded and offloaded averages ---\n")
    start = example.index("\n", start) + 1
    excerpt = textwrap.dedent(example[start:example.index("    # --- end of README excerpt ---")])
    assert quoted == excerpt
    assert len(quoted.splitlines()) <= 25
