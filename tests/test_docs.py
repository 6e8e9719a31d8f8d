"""The docs run as written: the quickstart's blocks pasted in order into a shell and one Python
session, and each plugin page's runnable example, against a real service and endpoint.

Only what cannot be pasted is changed: the Install block is skipped (this checkout is
installed), the service listens on a free port (``--port 0``) instead of 8421, and
``PASTE-ENDPOINT-ID`` becomes the id ``tether endpoint start`` printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def _blocks(page: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in BLOCK.finditer((ROOT / "docs" / page).read_text())]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(TETHER_HOME=str(home), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> str:
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args[:2]} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.timeout(300)
def test_the_quickstart_pastes_in_order(tmp_path: Path) -> None:
    env = _env(tmp_path / "home")
    endpoint_id = ""
    python: list[str] = []
    try:
        for lang, code in _blocks("quickstart.md"):
            if "pip install" in code:
                continue  # the Install section: this checkout is installed already
            if lang == "bash":
                code = code.replace("tether service start --detach", "tether service start --detach --port 0")
                if "tether endpoint stop" in code:  # section 7 ends the session: run what was pasted first
                    out = _run([sys.executable, "-c", "\n".join(python)], env, tmp_path)
                    assert "results" in out and "True" in out, out
                out = _run(["bash", "-euo", "pipefail", "-c", code], env, tmp_path)
                ids = re.findall(r"^[0-9a-f]{8}-[0-9a-f-]{27}$", out, re.M)
                endpoint_id = ids[-1] if "tether endpoint start" in code and ids else endpoint_id
            elif lang == "python":
                assert endpoint_id, "the quickstart runs Python before it starts an endpoint"
                python.append(code.replace("PASTE-ENDPOINT-ID", endpoint_id))
        assert python and endpoint_id
    finally:
        subprocess.run(["tether", "endpoint", "stop", "laptop"], env=env, capture_output=True, timeout=60)
        subprocess.run(["tether", "service", "stop"], env=env, capture_output=True, timeout=60)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("page", "section"), [("parsl.md", "## A runnable example"),
                                               ("parsl.md", "## Files without a shared file system"),
                                               ("dask.md", "## A runnable example")])
def test_each_plugin_pages_runnable_example_runs(tmp_path: Path, page: str, section: str) -> None:
    text = (ROOT / "docs" / page).read_text()
    example = text[text.index(section):]
    code = next(m[2] for m in BLOCK.finditer(example) if m[1] == "python")
    out = _run([sys.executable, "-c", code], _env(tmp_path / "home"), tmp_path)
    if "shared file system" in section:  # what the page's comments say it prints
        assert out.split("\n\n")[0] == "5 words" and "summarised" in out, out
        assert "BashExitFailure False" in out and out.rstrip().endswith("no such tool"), out
