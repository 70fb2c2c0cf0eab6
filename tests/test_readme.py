"""The README's offline commands run as written, in order, in a copy of the repo: the blocks marked
`<!-- test: ARGS | OLD => NEW -->`, with ARGS appended to every trainer command (shorter runs) and OLD replaced
by NEW (the names a shorter run gives). The quick start's download is served by the tests' own corpus, put where
prepare_wikitext.py caches that URL, so nothing is fetched."""
import os
import re
import shutil
import subprocess
import sys

import pytest

import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKED = re.compile(r"<!-- test:(.*?)-->\n```bash\n(.*?)```", re.S)
LEFT_OUT = shutil.ignore_patterns(".git", ".venv", "data", "out*", "hf", "sweeps", "__pycache__", ".pytest_cache",
                                  "gpu_check_out", ".ruff_cache")


def marked_commands():
    """[(command, ARGS, replacements)] of the marked blocks, in README order; continuation lines joined."""
    found = []
    for marker, block in MARKED.findall(open(os.path.join(REPO, "README.md")).read()):
        args, _, swaps = marker.partition("|")
        replace = [tuple(s.strip() for s in swap.split("=>")) for swap in swaps.split(",") if swap.strip()]
        for line in block.replace("\\\n", " ").splitlines():
            command = re.split(r"\s#\s", line, maxsplit=1)[0].strip()  # a comment ends the command
            if command:
                found.append((command, args.strip(), replace))
    return found


def test_the_readme_marks_its_quick_start_and_what_follows():
    commands = [c for c, _, _ in marked_commands()]
    assert any("config/shakespeare_char.py" in c for c in commands)
    assert any(c.startswith("python export_hf.py") for c in commands) and len(commands) >= 8


def test_the_readme_commands_run_as_written(tmp_path):
    pytest.importorskip("transformers")  # the export block loads the folder with it
    clone = tmp_path / "repo"
    shutil.copytree(REPO, clone, ignore=LEFT_OUT)
    (clone / "data" / "downloads").mkdir(parents=True)
    (clone / "data" / "downloads" / "input.txt").write_text(corpus.play(300_000))  # the quick start's URL
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for command, args, replace in marked_commands():
        for old, new in replace:
            command = command.replace(old, new)
        if re.search(r"\btrain_(gpt2|lstm)\.py\b", command):
            command = f"{command} {args}"
        result = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, command
