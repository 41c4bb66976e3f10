"""The benchmarks as commands: `python -m bench.NAME --help` prints the usage and runs nothing.

Three of them ignored their arguments, so asking one for help ran it: minutes of timing that then
overwrote its recorded results in bench/results, or the README's pictures.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def usage_name(name: str) -> str:
    """How argparse names `python -m bench.NAME` in its usage line: the file's name before Python 3.14, the
    command that ran it from 3.14 on."""
    return f"{name}.py" if sys.version_info < (3, 14) else f"{Path(sys.executable).name} -m bench.{name}"


def test_every_benchmark_answers_help_with_its_usage_and_writes_nothing():
    commands = sorted(
        path.stem for path in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__"' in path.read_text()
    )
    outputs = sorted(path for path in (ROOT / "bench" / "results").iterdir()) + sorted((ROOT / "docs").rglob("*.png"))
    written_before = {path: path.stat().st_mtime_ns for path in outputs}
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"bench.{name}", "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in commands
    }
    answers = {}
    for name, process in running.items():
        try:
            answers[name] = (process.communicate(timeout=120)[0], process.returncode)
        finally:
            process.kill()
    assert len(commands) >= 10
    for name, (output, returncode) in answers.items():
        assert returncode == 0 and output.startswith(f"usage: {usage_name(name)} "), (name, output[-500:])
    assert {path: path.stat().st_mtime_ns for path in outputs} == written_before
