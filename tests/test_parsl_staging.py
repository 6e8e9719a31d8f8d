"""Parsl apps' files through Tether (``staging="tether"``, the default), on an endpoint that cannot
see the submitter's directory: it runs in a mount namespace of its own where an empty tmpfs
covers that directory (``parsl_stack.endpoint_blind_to``), so every byte an app reads or writes
there crossed through the service. The workflow is written as on a laptop: relative paths,
the script's directory as the current one."""

from __future__ import annotations

import hashlib
import os
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from parsl import AUTO_LOGNAME, File, bash_app, python_app
from parsl.app.errors import BashExitFailure, MissingOutputs

from tether.local import LocalStack

from parsl_stack import blind_endpoint_missing, endpoint_blind_to, loaded, tether_executor

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.skipif(bool(blind_endpoint_missing()), reason=str(blind_endpoint_missing()))


@pytest.fixture(scope="module")
def laptop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The submitter's own directory, hidden from the blind endpoint."""
    return tmp_path_factory.mktemp("laptop")


@pytest.fixture(scope="module")
def blind(stack: LocalStack, laptop: Path) -> Iterator[str]:
    with endpoint_blind_to(stack, "blind", laptop) as endpoint_id:
        yield endpoint_id


@pytest.fixture
def workdir(laptop: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's directory on the laptop, and the current one, as for a script run there."""
    path = laptop / request.node.name
    path.mkdir()
    monkeypatch.chdir(path)
    return path


# --- apps: they run on the blind endpoint -----------------------------------------------------
@python_app
def count_lines(submitter_copy: str, inputs=(), outputs=()) -> dict:  # noqa: B006 - Parsl's idiom
    with open(inputs[0]) as fh:
        lines = fh.read().splitlines()
    with open(outputs[0], "w") as fh:
        fh.write(f"{len(lines)}\n")
    return {"input": inputs[0].filepath, "cwd": os.getcwd(), "sees_submitter_copy": os.path.exists(submitter_copy)}


@bash_app
def double(hidden: str, inputs=(), outputs=(), stdout=None, stderr=None) -> str:  # noqa: B006
    # names its files literally, relative to its directory, as a script written on a laptop does;
    # fails if it could see the laptop's directory
    return (f"test ! -e {hidden}/data && ./scale.sh 2 < out/count.txt > out/double.txt "
            f"&& echo doubled && echo a-note >&2")


@python_app
def concat(inputs=(), outputs=()) -> list:  # noqa: B006
    with open(outputs[0], "w") as out:
        for f in inputs:
            with open(f) as fh:
                out.write(fh.read())
    return [f.filepath for f in inputs]


@bash_app
def fails_after_writing(outputs=(), stdout=None, stderr=None) -> str:  # noqa: B006
    return f"echo partial > {outputs[0]}; echo 'something went wrong' >&2; exit 3"


@python_app
def forgets_its_output(outputs=()) -> int:  # noqa: B006
    return 1


@bash_app
def hello(stdout=AUTO_LOGNAME, stderr=AUTO_LOGNAME) -> str:  # noqa: B006
    return "echo hello from the endpoint"


@python_app
def reverse(inputs=(), outputs=()) -> int:  # noqa: B006
    data = open(inputs[0], "rb").read()
    with open(outputs[0], "wb") as fh:
        fh.write(data[::-1])
    return len(data)


# --- the workflow -----------------------------------------------------------------------------
def test_a_relative_path_workflow_runs_unchanged_without_a_shared_file_system(
        stack: LocalStack, blind: str, workdir: Path) -> None:
    (workdir / "data").mkdir()
    (workdir / "data" / "numbers.txt").write_text("1\n2\n3\n")
    (workdir / "scale.sh").write_text("#!/bin/sh\nread n; echo $((n * $1))\n")
    (workdir / "scale.sh").chmod(0o755)
    tasks = stack.endpoint_dir("blind") / "tasks"

    with loaded(workdir, tether_executor(stack, endpoint_id=blind)):
        counted = count_lines(str(workdir / "data" / "numbers.txt"),
                              inputs=[File("data/numbers.txt")], outputs=[File("out/count.txt")])
        # the second app takes the first's output (a DataFuture) and an executable script of the laptop's
        doubled = double(str(workdir), inputs=[counted.outputs[0], File("scale.sh")], outputs=[File("out/double.txt")],
                         stdout="logs/double.out", stderr=("logs/double.err", "w"))
        assert doubled.result(timeout=60) == 0
        seen = counted.result(timeout=60)

        # the endpoint never saw the laptop's file: it read a copy in the app's own directory there
        assert seen["sees_submitter_copy"] is False
        assert seen["input"] != str(workdir / "data" / "numbers.txt")
        assert seen["input"].startswith(str(tasks)) and seen["input"].endswith("/data/numbers.txt")
        assert seen["cwd"] == os.path.dirname(os.path.dirname(seen["input"]))

        # and every output came back to the laptop's relative paths before the futures resolved
        assert (workdir / "out" / "count.txt").read_text() == "3\n"
        assert (workdir / "out" / "double.txt").read_text() == "6\n"
        assert counted.outputs[0].filepath == "out/count.txt"  # the user's File is as they made it
        assert (workdir / "logs" / "double.out").read_text() == "doubled\n"
        assert (workdir / "logs" / "double.err").read_text().endswith("a-note\n")

        # files of one name from two absolute directories stay apart
        for sub in ("a", "b"):
            (workdir / sub).mkdir()
            (workdir / sub / "x.txt").write_text(f"from {sub}\n")
        both = concat(inputs=[File(str(workdir / "a" / "x.txt")), File(str(workdir / "b" / "x.txt"))],
                      outputs=[File(str(workdir / "both.txt"))])
        paths = both.result(timeout=60)
        assert (workdir / "both.txt").read_text() == "from a\nfrom b\n"
        assert len(set(paths)) == 2 and not any(p.startswith(str(workdir)) for p in paths)

        # AUTO_LOGNAME: Parsl's task_logs of this run, on the laptop
        h = hello()
        assert h.result(timeout=60) == 0
        assert Path(h.stdout).read_text() == "hello from the endpoint\n"
        assert Path(h.stdout).is_relative_to(workdir / "runinfo")

    assert list(tasks.iterdir()) == []  # each app's directory on the endpoint went with it


def test_a_failed_app_writes_no_outputs_and_says_why(stack: LocalStack, blind: str, workdir: Path) -> None:
    with loaded(workdir, tether_executor(stack, endpoint_id=blind)):
        with pytest.raises(BashExitFailure) as failed:
            fails_after_writing(outputs=[File("out/partial.txt")], stderr="logs/failed.err").result(timeout=60)
        assert failed.value.exitcode == 3
        assert not (workdir / "out" / "partial.txt").exists()  # made on the endpoint, not brought back
        assert "something went wrong" in (workdir / "logs" / "failed.err").read_text()  # streams come back

        with pytest.raises(MissingOutputs, match=r"did not make its output file\(s\) 'out/forgotten.txt'") as lost:
            forgets_its_output(outputs=[File("out/forgotten.txt")]).result(timeout=60)
        assert [f.filepath for f in lost.value.outputs] == ["out/forgotten.txt"]  # the laptop's path
        assert not (workdir / "out").exists()

        with pytest.raises(FileNotFoundError, match=r"input 'data/absent.txt' of app count_lines .*does not exist"):
            count_lines("", inputs=[File("data/absent.txt")], outputs=[File("out/never.txt")]).result(timeout=60)
        assert not (workdir / "out").exists()


def test_a_large_file_streams_through_the_service(stack: LocalStack, blind: str, workdir: Path) -> None:
    """20 MiB each way: past the session service's inline limit (4 MiB), so the bytes can only
    have travelled as blobs; this process never holds the input, and the output only once."""
    size = 20 * 1024 * 1024
    data = os.urandom(size)
    (workdir / "big.bin").write_bytes(data)
    expected = hashlib.sha256(data[::-1]).hexdigest()
    del data
    with loaded(workdir, tether_executor(stack, endpoint_id=blind)):
        tracemalloc.start()
        try:
            fut = reverse(inputs=[File("big.bin")], outputs=[File("big.reversed")])
            assert fut.result(timeout=120) == size
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert hashlib.sha256((workdir / "big.reversed").read_bytes()).hexdigest() == expected
    assert peak < 1.5 * size, f"the submitting process held {peak / size:.1f}x the file's size at its peak"


def test_staging_shared_uses_the_endpoints_paths(stack: LocalStack, blind: str, workdir: Path) -> None:
    """staging="shared" moves nothing: the blind endpoint cannot find the laptop's input."""
    (workdir / "data").mkdir()
    (workdir / "data" / "numbers.txt").write_text("1\n")
    absolute = str(workdir / "data" / "numbers.txt")
    with loaded(workdir, tether_executor(stack, endpoint_id=blind, staging="shared")):
        with pytest.raises(FileNotFoundError, match="numbers.txt"):
            count_lines(absolute, inputs=[File(absolute)], outputs=[File(str(workdir / "n.txt"))]).result(timeout=60)
    with pytest.raises(ValueError, match="staging must be one of 'tether', 'shared'"):
        tether_executor(stack, staging="nfs")
