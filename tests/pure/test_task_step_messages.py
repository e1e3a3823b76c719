"""External runs on the wire: `run`'s launch, `service_start`'s task_steps, and the task-step
messages' checks and framing (protocol/steps.py), with no worker."""

from __future__ import annotations

import asyncio
import dataclasses
import signal

import pytest

from bonjourgrid import protocol as p
from bonjourgrid import wire
from bonjourgrid.errors import ProtocolError
from bonjourgrid.worker.task_step import exit_status
from bonjourgrid.worker.task_steps import NOT_STORED_EXIT, script_text, verdict_for

RUN = p.Run("job-42", "t1", 1, "true", (), ("out",), {}, {})
SERVICE = p.ServiceStart("job-42", "slurmd", ("slurmd", "-D"))
DONE = p.TaskDone("job-42", "t1", 1, 0, (), "", "", 0.0, 0.1, 0, (), 0)


def test_a_worker_launched_run_goes_as_it_always_went() -> None:
    # Peers of an earlier release see the frame they know: no `launch`, no `task_steps`.
    assert "launch" not in wire.as_map(RUN)
    assert "task_steps" not in wire.as_map(SERVICE)
    assert wire.decode(wire.encode(RUN)).launch == "worker"  # type: ignore[attr-defined]


def test_an_external_run_and_a_task_step_service_say_so() -> None:
    external = dataclasses.replace(RUN, launch="external")
    assert wire.as_map(external)["launch"] == "external"
    assert wire.decode(wire.encode(external)) == external
    # a run too big for one frame keeps its launch in the head
    (head,) = p.split_run(external)
    assert isinstance(head, p.Run) and head.launch == "external"
    steps = dataclasses.replace(SERVICE, task_steps=True)
    assert wire.decode(wire.encode(steps)) == steps


@pytest.mark.parametrize(
    ("msg_type", "field", "value", "why"),
    [
        ("run", "launch", "slurm", "is not one of worker, external"),
        ("run", "launch", 1, "must be a string"),
        ("service_start", "task_steps", "yes", "must be true or false"),
        ("step_claim", "attempt", 0, "out of range"),
        ("step_claim", "job", "../etc", "not a valid job name"),
        ("step_exited", "exit_code", "3", "must be a whole number"),
        ("step_exited", "out_of_time", 0, "must be true or false"),
        ("step_granted", "command", "true\x00rm", "NUL"),
        ("step_granted", "env", {"A=B": "1"}, "without '='"),
        ("step_verdict", "stored", None, "must be true or false"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    msg_type: str, field: str, value: object, why: str
) -> None:
    samples = {
        "run": RUN,
        "service_start": SERVICE,
        "step_claim": p.StepClaim("job-42", "t1", 1),
        "step_exited": p.StepExited(0, 1.0, False),
        "step_granted": p.StepGranted("job-42", "t1", 1, "/s", "true", {}, "/o", "/e", {}),
        "step_verdict": p.StepVerdict(0, True, ""),
    }
    frame = p.pack_raw(msg_type, **{**wire.as_map(samples[msg_type]), field: value})
    with pytest.raises(ProtocolError, match=why):
        wire.decode(frame)


def _stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _framed(message: p.Message) -> bytes:
    frame = wire.encode(message)
    return len(frame).to_bytes(4, "big") + frame


async def test_task_step_frames_are_length_prefixed_and_checked() -> None:
    claim = p.StepClaim("job-42", "t1", 2)
    reader = _stream(_framed(claim) + _framed(p.StepStop("cancelled")))
    assert await p.recv_step(reader) == claim
    assert await p.recv_step(reader) == p.StepStop("cancelled")
    assert await p.recv_step(reader) is None  # the other end closed

    for data, why in [
        (b"\x00\x00", "inside a length prefix"),
        (_framed(claim)[:-2], "inside a frame"),
        ((1 << 30).to_bytes(4, "big"), "over the"),
        (_framed(p.Release("job-42")), "not a task-step message"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            await p.recv_step(_stream(data))


def test_a_step_exits_zero_only_when_the_outputs_are_stored() -> None:
    assert verdict_for(DONE) == p.StepVerdict(0, True, "")
    failed = dataclasses.replace(DONE, exit_code=3, error="")
    assert verdict_for(failed) == p.StepVerdict(3, False, "the command exited 3")
    lost = dataclasses.replace(DONE, error="the command exited 0 but did not write its output")
    assert verdict_for(lost).exit_code == NOT_STORED_EXIT != 0
    assert exit_status(-signal.SIGTERM) == 128 + signal.SIGTERM and exit_status(3) == 3


def test_the_task_step_script_runs_this_workers_bgrid_on_its_socket() -> None:
    from pathlib import Path

    text = script_text(Path("/c/sandboxes/service-x/service/task-step.sock"))
    assert text.startswith("#!/bin/sh\n")
    socket = "/c/sandboxes/service-x/service/task-step.sock"
    assert f"-m bonjourgrid.cli task-step --socket {socket}" in text
    assert text.rstrip().endswith('"$@"')
