"""The scheduler core's data plane: intermediates stay on peers, placement follows the
bytes, lost intermediates are made again, and what each prefetch policy orders."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.core import NodeRules, SchedulerCore, TaskData, TaskStatus
from bonjourgrid.coordinator.files import COORDINATOR
from bonjourgrid.coordinator.prefetch import PrefetchSettings

MB = 1_000_000


def ref(name: str, size: int = MB) -> FileRef:
    return FileRef(hashlib.sha256(name.encode()).hexdigest(), size)


Spec = tuple[str, list[str], list[str]]  # (task, inputs, outputs)


def build(
    specs: Iterable[Spec],
    sources: Iterable[str] = (),
    policy: str = "none",
    depth: int = 2,
    max_bytes: int = 10**12,
    broadcast: int = 0,
    finals: Iterable[str] | None = None,
    rules: Mapping[str, NodeRules] | None = None,
    caps: Mapping[str, int] | None = None,
    scripts: Mapping[str, tuple[bool, bool]] | None = None,
) -> SchedulerCore:
    """A core for tasks given by their files; dependencies follow the files. `scripts`:
    whether a task has a pre script and a post script (the pre skips it on exit code 9)."""
    specs = list(specs)
    producer = {out: name for name, _, outs in specs for out in outs}
    read = {path for _, ins, _ in specs for path in ins}
    keep = set(finals) if finals is not None else None
    tasks = []
    data = {}
    for name, ins, outs in specs:
        deps = sorted({producer[p] for p in ins if p in producer})
        tasks.append((name, deps, "", 1))
        final = any(o not in read for o in outs) or bool(keep and set(outs) & keep)
        pre, post = (scripts or {}).get(name, (False, False))
        data[name] = TaskData(
            tuple(ins), tuple(outs), collect=final, pre=pre, post=post, pre_skip=9 if pre else None
        )
    return SchedulerCore(
        tasks,
        data=data,
        sources={p: ref(p) for p in sources},
        prefetch=PrefetchSettings(policy, depth, max_bytes, broadcast),
        rules=rules,
        category_caps=caps,
    )


def of(out: list[core.Instruction], kind: type) -> list:  # type: ignore[type-arg]
    return [i for i in out if isinstance(i, kind)]


def placed(out: list[core.Instruction]) -> list[tuple[str, str]]:
    return [(i.task, i.peer) for i in of(out, core.Dispatch)]


def prefetched(out: list[core.Instruction]) -> list[tuple[str, FileRef]]:
    return [(p.peer, f) for p in of(out, core.Prefetch) for f, _ in p.files]


def report(s: SchedulerCore, task: str, now: float = 1.0) -> list[core.Instruction]:
    t = s.tasks[task]
    assert t.peer is not None
    outputs = tuple((o, ref(o)) for o in s.data[task].outputs)
    out = s.handle(core.TaskReported(t.peer, task, t.attempts, 0, "", outputs), now)
    for c in of(out, core.Collect):
        out += s.handle(core.OutputsCollected(c.task, c.attempt), now)
    s.validate_state()
    return out


# -- intermediates and placement --------------------------------------------------------


def test_an_intermediate_stays_on_its_peer_and_only_final_outputs_are_collected() -> None:
    s = build([("a", ["in"], ["mid"]), ("b", ["mid"], ["final"])], sources=["in"])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    out = report(s, "a")
    assert not of(out, core.Collect)  # mid stays on p1
    assert s.tasks["a"].status is TaskStatus.DONE
    assert placed(out) == [("b", "p1")]
    assert s.sources(ref("mid").digest, "p2") == ["p1"]  # not the coordinator: it lacks it
    assert s.sources(ref("in").digest, "p2") == ["p1", COORDINATOR]  # a replica, then us
    out = s.handle(core.TaskReported("p1", "b", 1, 0, "", (("final", ref("final")),)), 2.0)
    assert of(out, core.Collect) == [core.Collect("b", "p1", 1, (("final", ref("final")),))]


def test_keep_brings_an_intermediate_back() -> None:
    s = build([("a", ["in"], ["mid"]), ("b", ["mid"], ["final"])], ["in"], finals=["mid"])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    out = s.handle(core.TaskReported("p1", "a", 1, 0, "", (("mid", ref("mid")),)), 1.0)
    assert [c.task for c in of(out, core.Collect)] == ["a"]


def test_a_task_goes_to_the_peer_that_holds_its_input_bytes() -> None:
    s = build([("a", [], ["x"]), ("b", ["x"], ["y"]), ("c", [], ["z"])])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    s.handle(core.PeerJoined("p2", 1, {}), 0.0)
    where_a = s.tasks["a"].peer
    out = report(s, "a")
    assert placed(out) == [("b", where_a)]  # not the other free-to-be peer


def test_recruited_peers_caches_decide_where_tasks_run() -> None:
    s = build([(f"t{i}", [f"in{i}"], [f"out{i}"]) for i in range(4)], [f"in{i}" for i in range(4)])
    joined = [
        core.PeerJoined("p1", 2, {}, frozenset({ref("in2").digest, ref("in3").digest})),
        core.PeerJoined("p2", 2, {}, frozenset({ref("in0").digest, ref("in1").digest})),
    ]
    s.handle(joined[0], 0.0, schedule=False)
    out = s.handle(joined[1], 0.0)
    assert sorted(placed(out)) == [("t0", "p2"), ("t1", "p2"), ("t2", "p1"), ("t3", "p1")]


# -- lost intermediates -----------------------------------------------------------------


def test_a_lost_intermediate_is_made_again() -> None:
    s = build([("a", ["in"], ["mid"]), ("b", ["mid"], ["final"])], ["in"])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    report(s, "a")  # b is now running on p1, where mid is
    assert s.tasks["b"].peer == "p1"
    s.handle(core.PeerLost("p1", "kill -9"), 2.0)
    assert s.tasks["a"].status is TaskStatus.READY  # mid went with p1: a runs again
    assert s.tasks["b"].status is TaskStatus.WAITING  # and b waits for it
    assert s.tasks["a"].failures == s.tasks["b"].failures == 0
    s.validate_state()
    out = s.handle(core.PeerJoined("p2", 1, {}), 2.5)
    assert placed(out) == [("a", "p2")]
    assert placed(report(s, "a", 3.0)) == [("b", "p2")]


def test_a_chain_lost_with_its_peer_is_made_again_from_the_first_missing_file() -> None:
    s = build(
        [("a", ["in"], ["x"]), ("b", ["x"], ["y"]), ("c", ["y"], ["z"]), ("d", [], ["w"])],
        ["in"],
    )
    s.handle(core.PeerJoined("p1", 2, {}), 0.0)  # a and d
    report(s, "a")
    report(s, "b")  # c now runs on p1; p1 dies while it does
    s.handle(core.PeerLost("p1", "link down"), 2.0)
    assert s.tasks["a"].status is TaskStatus.READY  # x and y were only on p1
    assert s.tasks["b"].status is TaskStatus.WAITING
    assert s.tasks["c"].status is TaskStatus.WAITING
    assert s.tasks["d"].status is TaskStatus.READY  # it was running there
    assert s.tasks["a"].failures == 0  # a lost peer is not the task's fault
    s.validate_state()
    out = s.handle(core.PeerJoined("p2", 2, {}), 2.5)
    assert sorted(placed(out)) == [("a", "p2"), ("d", "p2")]


def reader_elsewhere() -> SchedulerCore:
    """b needs a "big" peer: it runs on p2 and reads x, made by a on p1."""
    s = SchedulerCore(
        [("a", [], "", 0), ("b", ["a"], "big", 0)],
        matches=lambda require, attrs: attrs.get("big") == "1",
        data={"a": TaskData((), ("x",), False), "b": TaskData(("x",), ("y",), True)},
    )
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    s.handle(core.PeerJoined("p2", 1, {"big": "1"}), 0.0)
    assert placed(report(s, "a")) == [("b", "p2")]
    assert s.sources(ref("x").digest, "p2") == ["p1"]
    return s


def test_a_lost_peer_remakes_at_once_what_a_running_reader_may_be_fetching_from_it() -> None:
    s = reader_elsewhere()
    out = s.handle(core.PeerLost("p1", "kill -9"), 2.0)
    # a runs again at once: not after b's fetch from p1 times out.
    assert s.tasks["a"].status is TaskStatus.READY
    assert s.tasks["b"].status is TaskStatus.RUNNING  # it may have x already
    notices = [n.message for n in of(out, core.Notice)]
    assert "peer p1 lost: remaking a (its output x was only there)" in notices
    assert any("was lost with peer p1" in why for _, why in s.story("a"))
    assert s.tasks["a"].rerun == "its output x was lost with peer p1"
    s.validate_state()
    assert placed(s.handle(core.PeerJoined("p3", 1, {}), 2.5)) == [("a", "p3")]
    # x exists again: b, maybe stuck on p1, is stopped and placed again, no retry used.
    out = report(s, "a", 3.0)
    assert [(i.task, i.peer, i.attempt) for i in of(out, core.StopRun)] == [("b", "p2", 1)]
    assert placed(out) == [("b", "p2")]
    b = s.tasks["b"]
    assert (b.attempts, b.failures) == (2, 0)
    assert any("stopped on p2: x exists again" in why for _, why in s.story("b"))
    # The stopped attempt's late report changes nothing.
    s.handle(core.TaskReported("p2", "b", 1, -1, "could not fetch x", ()), 3.5)
    assert b.status is TaskStatus.RUNNING and b.failures == 0
    report(s, "b", 4.0)
    assert s.finished is not None and s.finished.status == "succeeded"


def test_a_reader_that_had_the_lost_file_finishes_and_is_not_stopped() -> None:
    s = reader_elsewhere()
    s.handle(core.PeerLost("p1", "kill -9"), 2.0)
    report(s, "b", 2.5)  # it had fetched x before p1 died
    out = report(s, "a", 3.0)  # the remake was for nothing, and harmless
    assert not of(out, core.StopRun)
    assert s.finished is not None and s.finished.status == "succeeded"
    assert s.tasks["b"].attempts == 1


def test_a_reader_whose_fetch_failed_waits_for_the_remake_without_a_failure() -> None:
    s = reader_elsewhere()
    s.handle(core.PeerLost("p1", "kill -9"), 2.0)
    out = s.handle(core.TaskReported("p2", "b", 1, -1, "could not fetch x", ()), 2.5)
    b = s.tasks["b"]
    assert b.status is TaskStatus.WAITING and b.failures == 0  # retries: 0, and not failed
    assert placed(out) == [("a", "p2")]  # the freed slot remakes x
    assert placed(report(s, "a", 3.0)) == [("b", "p2")]
    s.validate_state()


# -- prefetch policies --------------------------------------------------------------------


def bag(n: int, policy: str, **kw: object) -> SchedulerCore:
    return build(
        [(f"t{i}", [f"in{i}"], [f"out{i}"]) for i in range(n)],
        [f"in{i}" for i in range(n)],
        policy,
        **kw,  # type: ignore[arg-type]
    )


def test_none_orders_no_prefetch() -> None:
    s = bag(6, "none")
    out = s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    assert len(placed(out)) == 1 and not of(out, core.Prefetch)
    assert not of(report(s, placed(out)[0][0]), core.Prefetch)


def test_lookahead_moves_the_inputs_of_the_next_tasks_planned_for_a_busy_peer() -> None:
    s = bag(6, "lookahead", depth=2)
    out = s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    assert placed(out) == [("t0", "p1")]
    assert prefetched(out) == [("p1", ref("in1")), ("p1", ref("in2"))]  # depth 2, in order
    assert all(src == (COORDINATOR,) for p in of(out, core.Prefetch) for _, src in p.files)
    out = report(s, "t0")
    assert placed(out) == [("t1", "p1")]  # the planned task, its input already moving
    assert prefetched(out) == [("p1", ref("in3"))]  # the plan is topped up to depth 2


def test_lookahead_plans_on_every_peer_and_an_idle_peer_takes_over_a_plan() -> None:
    s = bag(5, "lookahead", depth=1)
    s.handle(core.PeerJoined("p1", 1, {}), 0.0, schedule=False)
    out = s.handle(core.PeerJoined("p2", 1, {}), 0.0)
    assert len(placed(out)) == 2 and len(prefetched(out)) == 2
    assert {p for p, _ in prefetched(out)} == {"p1", "p2"}
    # p3 joins with nothing ready left: it takes over a planned task instead of idling.
    out = s.handle(core.PeerJoined("p3", 1, {}), 0.5)
    assert [p for _, p in placed(out)] == ["p3"]


def test_max_bytes_bounds_what_is_planned_ahead_on_a_peer() -> None:
    s = bag(6, "lookahead", depth=5, max_bytes=2 * MB)
    out = s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    assert len(prefetched(out)) == 2  # 2 x 1 MB fit, the third would not


def test_eager_plans_every_ready_task_and_moves_an_input_as_soon_as_it_exists() -> None:
    s = build(
        [("a", [], ["x"]), ("b", [], ["y"]), ("join", ["x", "y"], ["z"])]
        + [(f"t{i}", [f"in{i}"], [f"o{i}"]) for i in range(4)],
        [f"in{i}" for i in range(4)],
        policy="eager",
    )
    s.handle(core.PeerJoined("p1", 1, {}), 0.0, schedule=False)
    out = s.handle(core.PeerJoined("p2", 1, {}), 0.0)
    # two placed, the other four ready tasks planned at once, their inputs moving
    assert len(placed(out)) == 2
    moving = {f.digest for _, f in prefetched(out)}
    planned = [t for t in s.tasks.values() if t.planned_on]
    assert len(planned) == 4
    assert moving == {
        ref(s.data[t.name].inputs[0]).digest for t in planned if s.data[t.name].inputs
    }
    # `a` done: x moves to where `join` will run although `y` does not exist yet
    where = {t: s.tasks[t].peer for t in ("a", "b") if s.tasks[t].peer}
    if "a" in where:
        out = report(s, "a")
        join = s.tasks["join"]
        assert join.status is TaskStatus.WAITING and join.planned_on == where["a"]


def test_critical_path_moves_inputs_of_the_waiting_tasks_on_the_longest_path_first() -> None:
    # long: l0 -> l1 -> l2 -> l3, with l1 also reading a big side file made by `side`;
    # short: s0 -> s1. One slot each on two peers.
    specs = [
        ("l0", [], ["a"]),
        ("side", [], ["big"]),
        ("l1", ["a", "big"], ["b"]),
        ("l2", ["b"], ["c"]),
        ("l3", ["c"], ["d"]),
        ("s0", [], ["e"]),
        ("s1", ["e"], ["f"]),
    ]
    s = build(specs, policy="critical-path", depth=0)
    s.handle(core.PeerJoined("p1", 1, {}), 0.0, schedule=False)
    out = s.handle(core.PeerJoined("p2", 1, {}), 0.0)
    assert sorted(t for t, _ in placed(out)) == ["l0", "side"]  # highest bottom levels
    out = report(s, "side")
    # big exists, l1 (on the longest path) still waits for `a`: big moves to l0's peer now
    assert prefetched(out) == [(s.tasks["l0"].peer, ref("big"))]
    assert s.tasks["l1"].planned_on == s.tasks["l0"].peer
    # the same DAG under lookahead moves nothing for a waiting task
    s2 = build(specs, policy="lookahead", depth=0)
    s2.handle(core.PeerJoined("p1", 1, {}), 0.0, schedule=False)
    s2.handle(core.PeerJoined("p2", 1, {}), 0.0)
    assert not prefetched(report(s2, "side"))


def test_a_file_read_by_many_tasks_is_broadcast_peer_to_peer() -> None:
    readers = [(f"t{i}", ["ref"], [f"o{i}"]) for i in range(8)]
    s = build(readers, ["ref"], policy="none", broadcast=4)
    for p in ("p1", "p2", "p3", "p4"):
        s.handle(core.PeerJoined(p, 2, {}), 0.0, schedule=False)
    out = s.handle(core.Tick(), 0.0)
    big = ref("ref").digest
    first = of(out, core.Prefetch)
    assert len(first) == 1 and first[0].files[0][1][0] == COORDINATOR  # one copy from us
    assert not placed(out)  # readers wait for the file on their own peer
    p1 = first[0].peer
    out = s.handle(core.FileArrived(p1, big), 1.0)
    assert {t for t, p in placed(out) if p == p1} and all(p == p1 for _, p in placed(out))
    second = of(out, core.Prefetch)
    assert len(second) == 1 and second[0].files[0][1][0] == p1  # the holder sends the next
    out = s.handle(core.FileArrived(second[0].peer, big), 2.0)
    third = of(out, core.Prefetch)
    assert len(third) == 2  # two holders, two copies at once
    assert {pf.files[0][1][0] for pf in third} == {p1, second[0].peer}
    for pf in third:
        out = s.handle(core.FileArrived(pf.peer, big), 3.0)
    assert len({t.peer for t in s.tasks.values() if t.peer}) == 4  # every peer runs some
    sent_by_us = [pf for pf in first + second + third if pf.files[0][1][0] == COORDINATOR]
    assert len(sent_by_us) == 1
    s.validate_state()


# -- random runs ----------------------------------------------------------------------------


DataScenario = tuple[
    list[Spec], str, list[int], bool, dict[str, NodeRules], dict[str, tuple[bool, bool]]
]


@st.composite
def data_scenarios(
    draw: st.DrawFn,
) -> DataScenario:
    """A random DAG of tasks with files (some read one shared file), a policy, moves,
    whether the shared file is hashed while the job runs, node rules (priorities, a
    capped category, a noop task, a final task reading a source), and the tasks' pre/post
    scripts."""
    n = draw(st.integers(1, 10))
    specs: list[Spec] = []
    rules: dict[str, NodeRules] = {}
    for i in range(n):
        before = sorted(draw(st.sets(st.integers(0, i - 1), max_size=2))) if i else []
        inputs = [f"f{d}" for d in before] or [f"s{i}"]
        if draw(st.booleans()):
            inputs.append("shared")
        noop = draw(st.integers(0, 5)) == 0  # a noop writes nothing: a gate for `after`
        specs.append((f"t{i}", inputs, [] if noop else [f"f{i}"]))
        rule = NodeRules(
            priority=draw(st.integers(0, 2)),
            category=draw(st.sampled_from(["", "", "one"])),
            noop=noop,
        )
        if rule != NodeRules():
            rules[f"t{i}"] = rule
    unwritten = {f"f{name[1:]}" for name, _, outs in specs if not outs}  # by noop tasks
    specs = [(name, [p for p in ins if p not in unwritten], outs) for name, ins, outs in specs]
    if draw(st.booleans()):
        specs.append(("fin", ["s_fin"], ["f_fin"]))
        rules["fin"] = NodeRules(final=True)
    policy = draw(st.sampled_from(["none", "lookahead", "eager", "critical-path"]))
    scripts = {name: (draw(st.booleans()), draw(st.booleans())) for name, _, _ in specs}
    moves = draw(st.lists(st.integers(0, 11), max_size=80))
    return specs, policy, moves, draw(st.booleans()), rules, scripts


@given(data_scenarios())
@settings(max_examples=200, deadline=None)
def test_random_runs_with_data_keep_the_invariants_and_always_end(
    scenario: DataScenario,
) -> None:
    specs, policy, moves, hold_shared, rules, scripts = scenario
    sources = sorted({p for _, ins, _ in specs for p in ins if not p.startswith("f")})
    held = ["shared"] if hold_shared and "shared" in sources else []
    s = build(
        specs,
        [p for p in sources if p not in held],
        policy,
        depth=2,
        broadcast=2,
        rules=rules,
        caps={"one": 1},
        scripts=scripts,
    )
    s.hold_sources(held)
    s.validate_state()
    s.backoff_base_s = 0.5
    now, joined = 0.0, 0
    pending: list[tuple[str, str]] = []  # prefetches ordered, not answered yet

    def step(move: int) -> None:
        nonlocal now, joined
        now += 0.25
        running = [t for t in s.tasks.values() if t.status is TaskStatus.RUNNING]
        collecting = [t for t in s.tasks.values() if t.status is TaskStatus.COLLECTING]
        scripted = [t for t in s.tasks.values() if t.script]
        if move == 0 or not s.peers:
            joined += 1
            out = s.handle(core.PeerJoined(f"p{joined}", 1 + joined % 2, {}), now)
        elif move == 1:
            lost = sorted(s.peers)[0]
            pending[:] = [(p, d) for p, d in pending if p != lost]
            out = s.handle(core.PeerLost(lost, "silent"), now)
        elif move in (2, 3) and running:
            t = running[0]
            assert t.peer is not None
            outputs = tuple((o, ref(o)) for o in s.data[t.name].outputs)
            code = 0 if move == 2 else 1
            out = s.handle(core.TaskReported(t.peer, t.name, t.attempts, code, "", outputs), now)
        elif move == 4 and collecting:
            out = s.handle(core.OutputsCollected(collecting[0].name, collecting[0].attempts), now)
        elif move in (9, 10, 11) and scripted:  # a script ends: 0, 1, or the pre skips
            t = scripted[0]
            attempt = t.attempts + (1 if t.script == "pre" else 0)
            code = [0, 1, 9][move - 9]
            outputs = tuple((o, ref(o)) for o in s.data[t.name].outputs)
            out = s.handle(core.ScriptEnded(t.name, t.script, attempt, code, outputs=outputs), now)
        elif move == 8 and held:
            out = s.handle(core.SourcesHashed({held.pop(): ref("shared")}), now)
        elif move in (5, 6) and pending:
            peer, digest = pending.pop(0)
            if move == 5:
                out = s.handle(core.FileArrived(peer, digest), now)
            else:
                out = s.handle(core.PrefetchFailed(peer, digest, "cache full"), now)
        else:
            now = max(now, s.next_wakeup() or now)
            out = s.handle(core.Tick(), now)
        pending.extend((pf.peer, f.digest) for pf in of(out, core.Prefetch) for f, _ in pf.files)
        s.validate_state()
        placed = (TaskStatus.RUNNING, TaskStatus.COLLECTING)
        runs = [t for t in s.tasks.values() if t.status in placed]
        assert sum(t.category == "one" for t in runs) <= 1  # the cap holds, whatever happened
        for d in of(out, core.Dispatch):  # a task goes where it can get every input
            for path in s.data[d.task].inputs:
                r = s.files.ref(path)
                assert r is not None and (
                    s.files.holds(d.peer, r.digest) or s.sources(r.digest, d.peer)
                )

    for move in moves:
        if s.finished is None:
            step(move)
    for i in range(800):  # then everything succeeds, every prefetch arrives and every held
        if s.finished is None:  # source is hashed: it must end
            step([2, 4, 5, 8, 9][i % 5])
    assert s.finished is not None


def test_a_kept_task_whose_intermediate_no_peer_holds_runs_again_and_is_not_resumed() -> None:
    s = SchedulerCore(
        [("a", [], "", 0), ("b", ["a"], "", 0)],
        data={"a": TaskData((), ("mid",), False), "b": TaskData(("mid",), ("final",), True)},
        done={"a": (("mid", ref("mid")),)},  # kept from the journal; mid was on a peer
    )
    assert s.tasks["a"].resumed
    s.handle(core.PeerJoined("p1", 1, {}), 0.0, schedule=False)
    out = s.handle(core.PeersSettled(), 0.0)  # p1 does not hold mid: a is made again
    assert placed(out) == [("a", "p1")]
    assert not s.tasks["a"].resumed  # the report must not call it kept: it ran in this run
    s.validate_state()
    assert placed(report(s, "a")) == [("b", "p1")]
    assert s.tasks["a"].attempts == 1 and not s.tasks["a"].resumed


def test_an_idle_peer_holding_what_a_running_task_reads_is_held_until_that_task_ends() -> None:
    # Its data socket may be serving the reader: releasing it would revoke the job key.
    s = build([("a", [], ["x"]), ("b", ["x"], ["y"])])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    s.handle(core.TaskReported("p1", "a", 1, 0, "", (("x", ref("x")),)), 1.0)
    out = s.handle(core.TaskReported("p1", "b", 1, 1, "", ()), 2.0)  # b fails on p1
    assert of(out, core.Recruit)  # its retry wants another peer
    s.handle(core.PeerJoined("p2", 1, {}), 2.5)
    out = s.handle(core.Tick(), 3.0)  # the backoff is over: b reads x from p1, on p2
    assert out == [core.Dispatch("b", "p2", 2)]
    s.validate_state()
    assert "p1" in s.peers  # idle, nothing left to place, but p2 may be fetching x from it
    out = s.handle(core.TaskReported("p2", "b", 2, 0, "", (("y", ref("y")),)), 4.0)
    assert core.Release("p1") in out  # b is done reading: p1 serves no one now
    s.validate_state()


# -- sources hashed while the job runs ------------------------------------------------------


def test_tasks_reading_a_source_still_being_hashed_wait_and_the_others_run() -> None:
    s = build(
        [
            ("big", ["huge.dat"], ["b.out"]),
            ("small", ["tiny.dat"], ["s.out"]),
            ("both", ["b.out", "s.out"], ["r"]),
        ],
        sources=["tiny.dat"],
    )
    s.hold_sources(["huge.dat"])
    s.validate_state()
    assert s.tasks["big"].status is TaskStatus.WAITING
    out = s.handle(core.PeerJoined("p1", 2, {}), 0.0)
    assert placed(out) == [("small", "p1")]  # only the task whose inputs are known
    s.validate_state()
    huge = ref("huge.dat", 500 * MB)
    out = s.handle(core.SourcesHashed({"huge.dat": huge}), 0.5)
    assert placed(out) == [("big", "p1")]
    assert s.sources(huge.digest, "p1") == [COORDINATOR]  # served by the coordinator
    s.validate_state()
    report(s, "small")
    out = report(s, "big")
    assert placed(out) == [("both", "p1")]


def test_a_task_made_again_while_a_source_is_hashed_still_waits_for_it() -> None:
    s = build([("a", ["huge.dat", "x.dat"], ["a.out"])], sources=["x.dat"])
    s.hold_sources(["huge.dat"])
    out = s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    assert placed(out) == []
    s.handle(core.PeerLost("p1", "gone"), 0.1)  # recomputes what each task waits for
    s.validate_state()
    s.handle(core.PeerJoined("p2", 1, {}), 0.2)
    out = s.handle(core.SourcesHashed({"huge.dat": ref("huge.dat")}), 0.3)
    assert placed(out) == [("a", "p2")]
    s.validate_state()
