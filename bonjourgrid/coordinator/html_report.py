"""The job report as one self-contained HTML page: a Gantt chart per peer, the DAG coloured by
final state, the bytes by source, and the retries with their reasons.

It reads only the JSON report dict (`report.build_report`, or a `--report run.json` file),
so `bgrid report run.json -o run.html` draws any past run. Everything is inline (CSS and SVG,
no script, no font, no URL): lab LANs often have no internet. Every string that comes from the
report (task and peer names, errors, stderr) goes through `html.escape`; every number through
`_num`, so a hand-edited report can break the picture but never inject markup.
"""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

import networkx as nx

from bonjourgrid.units import format_size

# Gantt geometry (px): the chart is scaled to _GANTT_W whatever the makespan.
_GANTT_W = 1000
_LABEL_W = 140
_LANE_H = 18
_ROW_GAP = 8
# DAG geometry (px): layers (topological generations) are columns, left to right.
_NODE_W = 124
_NODE_H = 26
_COL_GAP = 40
_ROW_STEP = 34
_MAX_DAG_NODES = 600  # beyond this the drawing is unreadable anyway: the page says so
_MAX_LABEL = 17  # characters of a task name shown in a DAG node (the tooltip has it all)

_STATUS_COLOURS = {
    "done": "#4caf50",
    "failed": "#e53935",
    "skipped": "#bdbdbd",
    "running": "#fdd835",
    "collecting": "#fdd835",
    "ready": "#ffffff",
    "waiting": "#ffffff",
}
_FETCH_COLOUR = "#ffa726"  # waiting for input data
_RUN_COLOUR = "#1e88e5"  # computing
_FAILED_RUN_COLOUR = "#e53935"
_LOST_COLOUR = "#f8bbd0"  # an earlier attempt: failed, or its peer was lost

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.summary { color: #555; } .succeeded { color: #2e7d32; } .failed { color: #c62828; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; text-align: left;
  border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #fafafa; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { margin: 4px 0; padding: 6px; background: #f6f6f6; max-width: 900px; overflow-x: auto; }
svg text { font: 11px system-ui, sans-serif; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 14px;
  vertical-align: middle; border: 1px solid #888; }
.bar { height: 16px; display: inline-block; vertical-align: middle; background: #1e88e5; }
"""


def render_html(report: dict[str, Any]) -> str:
    """The whole page for one report."""
    tasks: dict[str, dict[str, Any]] = report.get("tasks") or {}
    title = f"{report.get('workflow', '')} ({report.get('job', '')})"
    status = str(report.get("status", ""))
    done = sum(1 for t in tasks.values() if t.get("status") == "done")
    peers = report.get("peers") or []
    summary = (
        f"<span class='{_e(status)}'>{_e(status)}</span> - {_e(report.get('reason', ''))}. "
        f"{done}/{len(tasks)} tasks done in {_num(report.get('makespan_s')):.2f} s "
        f"on {len(peers)} peer(s); prefetch: {_e(report.get('prefetch', '-'))}."
    )
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>bgrid report: {_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1><p class='summary' id='summary'>{summary}</p>",
        _gantt_section(report, tasks),
        _dag_section(report, tasks),
        _bytes_section(report),
        _retries_section(tasks),
        _tasks_section(tasks),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# -- Gantt -----------------------------------------------------------------------------------


def _gantt_section(report: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> str:
    by_peer: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for name, task in tasks.items():
        if task.get("peer") and task.get("start") is not None and task.get("end") is not None:
            by_peer[str(task["peer"])].append((name, task))
        for attempt in task.get("history") or []:
            # an attempt that failed, or whose peer was lost: where and when it ran
            if not isinstance(attempt, dict) or not attempt.get("peer") or "start" not in attempt:
                continue
            last = (attempt["peer"], attempt["start"]) == (task.get("peer"), task.get("start"))
            if not last:  # the last attempt, failed too, is the task's own bar
                by_peer[str(attempt["peer"])].append((name, {**attempt, "end": attempt["t"]}))
    head = (
        "<section id='gantt'><h2>What ran where</h2><p class='legend'>"
        f"<span style='background:{_FETCH_COLOUR}'></span>waiting for input data (fetch_s)"
        f"<span style='background:{_RUN_COLOUR}'></span>computing (run_s)"
        f"<span style='background:{_FAILED_RUN_COLOUR}'></span>computing, failed"
        "<span style='background:#e0e0e0'></span>other (dispatch, returning outputs)"
        f"<span style='background:{_LOST_COLOUR}'></span>an attempt that failed or was lost</p>"
    )
    if not by_peer:
        return head + "<p>No task ran in this job.</p></section>"
    ends = [_num(t["end"]) for rows in by_peer.values() for _, t in rows]
    end = max([_num(report.get("makespan_s")), *ends])
    # The chart starts with the first task: recruiting and staging come before it.
    first = min(_num(t["start"]) for rows in by_peer.values() for _, t in rows)
    step = _nice_step(max(end - first, 1e-3) / 10)
    origin = step * int(first / step)
    scale = _GANTT_W / max(end - origin, 1e-3)
    head += (
        f"<p>Seconds since the job started; the first task started at {first:.2f} s "
        "(recruiting peers and staging inputs came before).</p>"
    )
    rows: list[str] = []
    y = 24
    for peer in sorted(by_peer):
        lanes = _pack_lanes(by_peer[peer])
        height = max(1, len(lanes)) * _LANE_H
        rows.append(f"<g class='gantt-row' data-peer='{_e(peer)}'>")
        rows.append(
            f"<rect x='0' y='{y - 2}' width='{_LABEL_W + _GANTT_W + 10}' height='{height + 4}' "
            "fill='#f7f7f7'/>"
            f"<text x='4' y='{y + 13}'>{_e(_short(peer, 22))}<title>{_e(peer)}</title></text>"
        )
        for lane, entries in enumerate(lanes):
            for name, task in entries:
                x0 = _LABEL_W - origin * scale
                rows.append(_gantt_bar(name, task, x0, y + lane * _LANE_H, scale))
        rows.append("</g>")
        y += height + _ROW_GAP
    axis = _time_axis(origin, end, step, scale, y)
    svg = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{_LABEL_W + _GANTT_W + 20}' "
        f"height='{y + 24}' role='img' aria-label='Gantt chart per peer'>"
        + "".join(rows)
        + axis
        + "</svg>"
    )
    return head + svg + "</section>"


def _pack_lanes(
    entries: list[tuple[str, dict[str, Any]]],
) -> list[list[tuple[str, dict[str, Any]]]]:
    """Tasks that overlap on one peer (it has several CPUs) go to separate lanes."""
    lanes: list[list[tuple[str, dict[str, Any]]]] = []
    lane_end: list[float] = []
    for name, task in sorted(entries, key=lambda e: (_num(e[1]["start"]), e[0])):
        start = _num(task["start"])
        for i, end in enumerate(lane_end):
            if end <= start:
                lanes[i].append((name, task))
                lane_end[i] = _num(task["end"])
                break
        else:
            lanes.append([(name, task)])
            lane_end.append(_num(task["end"]))
    return lanes


def _gantt_bar(name: str, task: dict[str, Any], x0: float, y: float, scale: float) -> str:
    start, end = _num(task["start"]), _num(task["end"])
    if "what" in task:
        return _gantt_attempt(name, task, x0 + start * scale, y, max(1.0, (end - start) * scale))
    fetch, run = max(0.0, _num(task.get("fetch_s"))), max(0.0, _num(task.get("run_s")))
    failed = task.get("status") == "failed"
    tip = (
        f"{name} on {task.get('peer')}: {start:.3f}-{end:.3f} s, data wait {fetch:.3f} s, "
        f"compute {run:.3f} s, {int(_num(task.get('attempts')))} attempt(s), "
        f"{task.get('status')}" + (f": {task['error']}" if task.get("error") else "")
    )
    h = _LANE_H - 3
    whole = max(1.0, (end - start) * scale)
    fetch_w = min(whole, fetch * scale)
    run_w = min(whole - fetch_w, run * scale)
    colour = _FAILED_RUN_COLOUR if failed else _RUN_COLOUR
    x = x0 + start * scale
    label = ""
    if whole > 30:  # a nested svg clips the name to its bar
        label = (
            f"<svg x='{x:.1f}' y='{y:.1f}' width='{whole:.1f}' height='{h}'>"
            f"<text x='3' y='{h - 4}' fill='#fff'>{_e(_short(name, int(whole / 6)))}</text></svg>"
        )
    return (
        f"<g class='gantt-task' data-task='{_e(name)}'><title>{_e(tip)}</title>"
        f"<rect x='{x:.1f}' y='{y:.1f}' width='{whole:.1f}' height='{h}' fill='#e0e0e0' "
        "stroke='#9e9e9e' stroke-width='0.5'/>"
        f"<rect class='fetch' x='{x:.1f}' y='{y:.1f}' width='{fetch_w:.1f}' height='{h}' "
        f"fill='{_FETCH_COLOUR}'/>"
        f"<rect class='run' x='{x + fetch_w:.1f}' y='{y:.1f}' width='{run_w:.1f}' height='{h}' "
        f"fill='{colour}'/>{label}</g>"
    )


def _gantt_attempt(name: str, attempt: dict[str, Any], x: float, y: float, width: float) -> str:
    tip = (
        f"{name}, attempt {int(_num(attempt.get('attempt')))} on {attempt.get('peer')}: "
        f"{_num(attempt.get('start')):.3f}-{_num(attempt.get('t')):.3f} s: {attempt.get('what')}"
    )
    return (
        f"<g class='gantt-attempt' data-task='{_e(name)}'><title>{_e(tip)}</title>"
        f"<rect x='{x:.1f}' y='{y:.1f}' width='{width:.1f}' height='{_LANE_H - 3}' "
        f"fill='{_LOST_COLOUR}' stroke='{_FAILED_RUN_COLOUR}' stroke-dasharray='3 2'/></g>"
    )


def _time_axis(origin: float, end: float, step: float, scale: float, y: float) -> str:
    ticks = []
    t = origin
    while t <= end + 1e-9:
        x = _LABEL_W + (t - origin) * scale
        ticks.append(
            f"<line x1='{x:.1f}' y1='16' x2='{x:.1f}' y2='{y}' stroke='#ddd'/>"
            f"<text x='{x:.1f}' y='12' text-anchor='middle'>{t:g} s</text>"
        )
        t = round(t + step, 9)
    return "<g class='axis'>" + "".join(ticks) + "</g>"


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least `raw`."""
    power = 10.0 ** int(f"{raw:e}".split("e")[1])
    for mult in (1, 2, 5, 10):
        if mult * power >= raw:
            return mult * power
    return 10 * power


# -- DAG -------------------------------------------------------------------------------------


def _dag_section(report: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> str:
    head = "<section id='dag'><h2>The workflow, by final state</h2><p class='legend'>" + "".join(
        f"<span style='background:{colour}'></span>{status}"
        for status, colour in _STATUS_COLOURS.items()
        if status not in ("collecting", "ready")
    )
    head += "<span style='border:2px dashed #555'></span>kept from an earlier run</p>"
    graph = nx.DiGraph()
    graph.add_nodes_from(tasks)
    for edge in report.get("edges") or []:
        if isinstance(edge, list | tuple) and len(edge) == 2:
            graph.add_edge(str(edge[0]), str(edge[1]))
    if "edges" not in report:
        head += "<p>(this report has no edges: an older bgrid wrote it; tasks only)</p>"
    if graph.number_of_nodes() > _MAX_DAG_NODES:
        return head + f"<p>{graph.number_of_nodes()} tasks: too many to draw.</p></section>"
    if not nx.is_directed_acyclic_graph(graph):
        return head + "<p>The edges of this report form a cycle: not drawn.</p></section>"
    position = _layout(graph)
    width = max((x for x, _ in position.values()), default=0) + _NODE_W + 20
    height = max((y for _, y in position.values()), default=0) + _NODE_H + 20
    edges = []
    for u, v in graph.edges:
        (x1, y1), (x2, y2) = position[u], position[v]
        x1, y1, x2, y2 = x1 + _NODE_W, y1 + _NODE_H / 2, x2, y2 + _NODE_H / 2
        mid = (x1 + x2) / 2
        edges.append(
            f"<path class='dag-edge' d='M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},"
            f"{y2:.0f} {x2:.0f},{y2:.0f}' fill='none' stroke='#90a4ae' "
            "marker-end='url(#arrow)'/>"
        )
    nodes = [_dag_node(name, tasks.get(name, {}), *position[name]) for name in graph.nodes]
    svg = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        "role='img' aria-label='the workflow DAG'><defs><marker id='arrow' viewBox='0 0 10 10' "
        "refX='10' refY='5' markerWidth='6' markerHeight='6' orient='auto'>"
        "<path d='M0,0 L10,5 L0,10 z' fill='#90a4ae'/></marker></defs>"
        + "".join(edges)
        + "".join(nodes)
        + "</svg>"
    )
    return head + svg + "</section>"


def _layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Topological generations as columns; in each, nodes ordered by their parents' mean row
    (one barycentre pass, enough to untangle the usual fan-out/fan-in)."""
    row: dict[str, float] = {}
    position: dict[str, tuple[float, float]] = {}
    for col, layer in enumerate(nx.topological_generations(graph)):

        def key(name: str) -> tuple[float, str]:
            parents = [row[p] for p in graph.predecessors(name)]
            return (sum(parents) / len(parents) if parents else 0.0, name)

        for i, name in enumerate(sorted(layer, key=key)):
            row[name] = i
            position[name] = (10 + col * (_NODE_W + _COL_GAP), 10 + i * _ROW_STEP)
    return position


def _dag_node(name: str, task: dict[str, Any], x: float, y: float) -> str:
    status = str(task.get("status", "waiting"))
    colour = _STATUS_COLOURS.get(status, "#ffffff")
    dash = " stroke-dasharray='4 2' stroke-width='2'" if task.get("resumed") else ""
    text_colour = "#fff" if status in ("done", "failed") else "#222"
    attempts = int(_num(task.get("attempts")))
    tip = f"{name}: {status}, {attempts} attempt(s)" + (
        f", on {task['peer']}" if task.get("peer") else ""
    )
    if task.get("error"):
        tip += f": {task['error']}"
    retry = f" x{attempts}" if attempts > 1 else ""
    return (
        f"<g class='dag-node' data-task='{_e(name)}' data-status='{_e(status)}'>"
        f"<title>{_e(tip)}</title>"
        f"<rect x='{x:.0f}' y='{y:.0f}' width='{_NODE_W}' height='{_NODE_H}' rx='5' "
        f"fill='{colour}' stroke='#555'{dash}/>"
        f"<text x='{x + 8:.0f}' y='{y + 17:.0f}' fill='{text_colour}'>"
        f"{_e(_short(name, _MAX_LABEL))}{retry}</text></g>"
    )


# -- bytes, retries, tasks -------------------------------------------------------------------

_BYTE_SOURCES = (
    ("from_coordinator", "from the coordinator"),
    ("peer_to_peer", "peer to peer"),
    ("cache_hits", "cache hits (not moved)"),
    ("to_submitter", "back to the submitter"),
)


def _bytes_section(report: dict[str, Any]) -> str:
    moved: dict[str, Any] = report.get("bytes") or {}
    values = {key: max(0.0, _num(moved.get(key))) for key, _ in _BYTE_SOURCES}
    top = max([*values.values(), 1.0])
    rows = "".join(
        f"<tr class='bytes-row' data-source='{key}'><td>{label}</td>"
        f"<td class='n'>{format_size(values[key])}</td><td class='n'>{int(values[key]):,}</td>"
        f"<td><span class='bar' style='width:{400 * values[key] / top:.0f}px'></span></td></tr>"
        for key, label in _BYTE_SOURCES
    )
    time = report.get("time") or {}
    return (
        "<section id='bytes'><h2>Bytes by source</h2><table>"
        f"<tr><th>source</th><th>size</th><th>bytes</th><th></th></tr>{rows}</table>"
        f"<p>Summed over tasks: {_num(time.get('data_wait_s')):.2f} s waiting for input data, "
        f"{_num(time.get('compute_s')):.2f} s computing.</p></section>"
    )


def _retries_section(tasks: dict[str, dict[str, Any]]) -> str:
    troubled = sorted(
        name
        for name, t in tasks.items()
        if _num(t.get("attempts")) > 1 or t.get("status") == "failed" or t.get("history")
    )
    head = "<section id='retries'><h2>Retries and why</h2>"
    if not troubled:
        return head + "<p>Every task succeeded at its first attempt.</p></section>"
    rows = []
    for name in troubled:
        task = tasks[name]
        history = "".join(
            f"<li>{_num(h.get('t')):.2f} s"
            + (f" on {_e(h['peer'])}" if h.get("peer") else "")
            + (f" (attempt {int(_num(h.get('attempt')))})" if h.get("attempt") else "")
            + f": {_e(h.get('what', ''))}</li>"
            for h in task.get("history") or []
            if isinstance(h, dict)
        )
        tail = str(task.get("stderr_tail") or "").strip()
        rows.append(
            f"<tr class='retry-row' data-task='{_e(name)}'><td>{_e(name)}</td>"
            f"<td>{_e(task.get('status', ''))}</td>"
            f"<td class='n'>{int(_num(task.get('attempts')))}</td>"
            f"<td>{_e(task.get('peer') or '-')}</td>"
            f"<td>{_e(task.get('error', ''))}"
            + (f"<ul>{history}</ul>" if history else "")
            + (f"<pre>{_e(tail)}</pre>" if tail else "")
            + "</td></tr>"
        )
    return (
        head + "<table><tr><th>task</th><th>final state</th><th>attempts</th><th>last peer</th>"
        "<th>error; failed attempts (seconds since the job started)</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _tasks_section(tasks: dict[str, dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{_e(t.get('status', ''))}</td>"
        f"<td>{_e(t.get('peer') or '-')}</td>"
        + "".join(
            f"<td class='n'>{_fmt_s(t.get(key))}</td>"
            for key in ("start", "end", "fetch_s", "run_s")
        )
        + f"<td class='n'>{int(_num(t.get('attempts')))}</td>"
        f"<td class='n'>{format_size(_num(t.get('bytes_fetched')))}</td></tr>"
        for name, t in sorted(tasks.items(), key=lambda e: (_num(e[1].get("start")), e[0]))
    )
    return (
        f"<section id='tasks'><details><summary>All {len(tasks)} tasks</summary><table>"
        "<tr><th>task</th><th>state</th><th>peer</th><th>start</th><th>end</th>"
        "<th>data wait</th><th>compute</th><th>attempts</th><th>fetched itself</th></tr>"
        f"{rows}</table></details></section>"
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object) -> float:
    """A number from the report, 0 for anything else (None, a string in a hand-made file)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _fmt_s(value: object) -> str:
    return "-" if value is None else f"{_num(value):.3f}"


def _short(text: str, limit: int) -> str:
    limit = max(limit, 2)
    return text if len(text) <= limit else text[: limit - 1] + "…"
