"""Task logs: the bounded stdout/stderr fields of `task_done`, and where the coordinator
keeps them (coordinator/logs.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bonjourgrid import protocol as p
from bonjourgrid import wire
from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator.logs import LOGS_DIR, LogKeeper, find_log, truncation_note
from bonjourgrid.errors import ConfigError, ProtocolError
from bonjourgrid.worker.daemon import _encode_reply
from bonjourgrid.worker.sandbox import read_tail

D1 = "ab" * 32


def done(**changes: object) -> p.TaskDone:
    msg = p.TaskDone("job-42", "t1", 1, 0, (), "", "", 0.1, 0.2, 0, (), 0)
    return dataclasses.replace(msg, **changes)  # type: ignore[arg-type]


def test_logs_round_trip_at_their_bound_and_the_message_fits_a_frame() -> None:
    out, err = b"o" * p.MAX_LOG, bytes(range(256)) * (p.MAX_LOG // 256)
    msg = done(stdout=out, stderr=err, stdout_size=5 * p.MAX_LOG, stderr_size=p.MAX_LOG)
    frame = wire.encode(msg)
    assert len(frame) < p.MAX_CONTROL_FRAME
    assert wire.decode(frame) == msg


def test_a_message_without_logs_decodes_with_none() -> None:
    body = wire.as_map(done())
    for key in ("stdout", "stderr", "stdout_size", "stderr_size"):
        del body[key]
    decoded = wire.decode(
        p.pack_raw("task_done", **{k: v for k, v in body.items() if k not in "vt"})
    )
    assert isinstance(decoded, p.TaskDone)
    assert (decoded.stdout, decoded.stderr, decoded.stdout_size) == (b"", b"", 0)


@pytest.mark.parametrize(
    "field, value",
    [("stdout", b"x" * (p.MAX_LOG + 1)), ("stderr", "text, not bytes"), ("stdout_size", -1)],
)
def test_logs_over_their_bound_or_of_the_wrong_type_are_refused(field: str, value: object) -> None:
    body = {k: v for k, v in wire.as_map(done()).items() if k not in ("v", "t")}
    body[field] = value
    with pytest.raises(ProtocolError, match=field):
        wire.decode(p.pack_raw("task_done", **body))


def test_a_report_too_big_for_a_frame_keeps_the_last_bytes_of_its_logs() -> None:
    # Outputs enough to fill most of a frame: the logs give way, from their heads.
    outputs = tuple((f"out/{i:06d}-{'x' * 20}.dat", FileRef(D1, i)) for i in range(30_000))
    out = b"head " + b"o" * (p.MAX_LOG - 10) + b" tail"
    msg = done(outputs=outputs, stdout=out, stderr=b"e" * p.MAX_LOG, stdout_size=len(out))
    with pytest.raises(ProtocolError):
        wire.encode(msg)
    sent = wire.decode(_encode_reply(msg))
    assert isinstance(sent, p.TaskDone)
    assert sent.outputs == outputs
    assert 0 < len(sent.stdout) < len(out) and sent.stdout.endswith(b" tail")
    assert sent.stdout_size == len(out)  # still says how much there was


def test_read_tail_keeps_the_last_bytes_and_the_size(tmp_path: Path) -> None:
    path = tmp_path / "stdout"
    path.write_bytes(b"0123456789")
    assert read_tail(path, 4) == (b"6789", 10)
    assert read_tail(path, 100) == (b"0123456789", 10)
    assert read_tail(tmp_path / "absent", 4) == (b"", 0)


def test_kept_logs_are_files_per_attempt_and_the_report_names_them(tmp_path: Path) -> None:
    keeper = LogKeeper(tmp_path, "wf-abc123")
    keeper.keep("t1", 1, b"first out\n", 10, b"first err\n", 10)
    keeper.keep("t1", 2, b"tail", 1000, b"", 0)
    one = tmp_path / LOGS_DIR / "wf-abc123" / "t1.1.out"
    assert one.read_bytes() == b"first out\n"
    two = tmp_path / LOGS_DIR / "wf-abc123" / "t1.2.out"
    assert two.read_bytes() == truncation_note(996) + b"tail"  # says what was dropped
    report = keeper.report("t1")
    assert report is not None
    assert report["attempt"] == 2 and report["stdout"] == str(two)
    assert report["stdout_dropped_bytes"] == 996
    assert [a["stdout"] for a in report["attempts"]] == [str(one), str(two)]
    assert keeper.report("t2") is None


def read(path: Path | None) -> bytes:
    assert path is not None, "a log that should have been kept was not"
    return path.read_bytes()


def test_find_log_by_job_id_or_workflow_name_latest_attempt_or_asked(tmp_path: Path) -> None:
    keeper = LogKeeper(tmp_path, "my-wf-abc123")
    keeper.keep("t1", 1, b"one", 3, b"err one", 7)
    keeper.keep("t1", 2, b"two", 3, b"err two", 7)
    keeper.close()
    assert read(find_log(tmp_path, "my-wf-abc123", "t1")) == b"two"
    assert read(find_log(tmp_path, "my wf", "t1", attempt=1)) == b"one"  # workflow name
    assert read(find_log(tmp_path, "my wf", "t1", stderr=True)) == b"err two"
    with pytest.raises(ConfigError, match="no attempt 3: 1, 2"):
        find_log(tmp_path, "my-wf-abc123", "t1", attempt=3)
    with pytest.raises(ConfigError, match="tasks with logs: t1"):
        find_log(tmp_path, "my-wf-abc123", "t9")
    with pytest.raises(ConfigError, match="its jobs: my-wf-abc123"):
        find_log(tmp_path, "other", "t1")
    with pytest.raises(ConfigError, match="--dir"):
        find_log(tmp_path / "elsewhere", "my-wf-abc123", "t1")


def test_an_empty_stream_writes_no_file_but_its_attempt_is_known(tmp_path: Path) -> None:
    keeper = LogKeeper(tmp_path, "quiet-abc123")
    keeper.keep("silent", 1, b"", 0, b"", 0)
    keeper.keep("grumbles", 1, b"", 0, b"oops\n", 5)
    job_dir = tmp_path / LOGS_DIR / "quiet-abc123"
    # Before close: a `bgrid logs` run while the job goes on already sees both attempts.
    assert find_log(tmp_path, "quiet-abc123", "silent") is None
    keeper.close()
    assert sorted(p.name for p in job_dir.iterdir()) == ["attempts", "grumbles.1.err"]
    report = keeper.report("silent")
    assert report is not None and report["stdout"] is None and report["stderr"] is None
    assert find_log(tmp_path, "quiet-abc123", "silent", stderr=True) is None
    assert find_log(tmp_path, "quiet-abc123", "grumbles") is None
    assert read(find_log(tmp_path, "quiet-abc123", "grumbles", stderr=True)) == b"oops\n"
    with pytest.raises(ConfigError, match="tasks with logs: grumbles, silent"):
        find_log(tmp_path, "quiet-abc123", "never-ran")
