"""Recruitment: which peers of the LAN fit a job, in what order, and why the others do not.

A job runs on one backend, and takes only the peers that advertise its middleware in `mw`
(backends/base.py `Capabilities.middleware`: "native" for our own workers, "slurm" where
slurmd and munged are installed...); the others are rejected with what they do advertise.

Selection is pure (`select_candidates`), so the rules are tested without a network.
Reserving is the shell's job: it asks candidates in rank order and keeps those that grant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bonjourgrid.dag import Workflow
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.requirements import Requirement


@dataclass(frozen=True)
class JobNeeds:
    """What a job asks of its peers."""

    grid: str  # fingerprint of the coordinator's grid key
    require: Requirement
    max_cost: float | None = None
    workers_min: int = 1
    workers_max: int = 8
    rank: str = "cost"  # "cost" (cost, cached bytes, cpus) or "cpus" (cpus, cost, cached bytes)
    # Why a peer of the grid may not be sent anything (its credential does not verify, or it
    # was revoked: credentials.CredentialCheck); None admits it. Unset: --insecure.
    admit: Callable[[PeerRecord], str | None] | None = field(default=None, compare=False)
    middleware: str = "native"  # what a peer's `mw` must hold: the backend's middleware


@dataclass(frozen=True)
class Selection:
    candidates: list[PeerRecord]  # fitting idle peers, best first
    rejected: dict[str, str]  # peer name -> why it was not chosen


def select_candidates(peers: Sequence[PeerRecord], needs: JobNeeds) -> Selection:
    candidates = []
    rejected = {}
    for peer in peers:
        if peer.grid != needs.grid:
            rejected[peer.name] = f"serves another grid ({peer.grid})"
        elif needs.admit is not None and (refusal := needs.admit(peer)) is not None:
            rejected[peer.name] = f"is not admitted: it {refusal}"
        elif peer.state != "idle":
            rejected[peer.name] = f"is {peer.state}" + (f" by job {peer.job}" if peer.job else "")
        elif needs.middleware not in peer.mw:
            advertised = ", ".join(peer.mw) or "nothing"
            rejected[peer.name] = f"has no {needs.middleware} (advertises: {advertised})"
        elif needs.max_cost is not None and peer.cost > needs.max_cost:
            rejected[peer.name] = f"costs {peer.cost:g} > max {needs.max_cost:g}"
        elif (unmet := needs.require.explain(peer.attrs())) is not None:
            rejected[peer.name] = f"does not satisfy {unmet}"
        else:
            candidates.append(peer)
    return Selection(rank(candidates, needs), rejected)


def rank(
    candidates: list[PeerRecord],
    needs: JobNeeds,
    cached_bytes: Callable[[PeerRecord], int] = lambda peer: 0,
) -> list[PeerRecord]:
    """Best first: by the job's rank (cost, or cpus), then by the bytes of the job's inputs
    a peer already caches (what moves once need not move again), then by the other one."""
    if needs.rank == "cpus":
        return sorted(candidates, key=lambda p: (-p.cpus, p.cost, -cached_bytes(p), p.name))
    return sorted(candidates, key=lambda p: (p.cost, -cached_bytes(p), -p.cpus, p.name))


def explain_shortage(
    seen: Sequence[PeerRecord], selection: Selection, needs: JobNeeds, granted: int
) -> str:
    """A message for the user when fewer than `workers_min` peers were recruited."""
    head = (
        f"recruited {granted} peer(s) of grid {needs.grid}, the job needs at least "
        f"{needs.workers_min}"
    )
    if not seen:
        return (
            head + ": no BonjourGrid peer answered on this network. Start `bgrid worker` "
            "on the desktops (check --interface), or try `bgrid submit --local 3`."
        )
    other_grids = sorted({p.grid for p in seen if p.grid != needs.grid})
    lines = [head + f". {len(seen)} peer(s) seen:"]
    lines += [f"  {name}: {why}" for name, why in sorted(selection.rejected.items())]
    if other_grids and all(p.grid != needs.grid for p in seen):
        lines.append(
            "Every peer seen serves another grid (" + ", ".join(other_grids) + "): this "
            "desktop holds a different grid key. Copy the grid key of those peers here "
            "(`bgrid keys show` on one of them says how), or start workers with this key."
        )
    if any(why.startswith("has no ") for why in selection.rejected.values()):
        lines.append(
            f"This job's backend runs on peers with {needs.middleware} installed: install it on "
            "the desktops (a worker detects it on PATH), or tell a worker it has it "
            f"(`bgrid worker --middleware {needs.middleware}`, or `middleware` in worker.toml)."
        )
    if any(why.startswith("is not admitted") for why in selection.rejected.values()):
        lines.append(
            "A peer is admitted only with a credential this grid issued: on this desktop run "
            "`bgrid keys enroll NAME` for each worker desktop, and `bgrid keys join ...` there."
        )
    return "\n".join(lines)


def needs_from(
    workflow: Workflow,
    grid: str,
    require: str | None,
    max_cost: float | None,
    workers: tuple[int, int] | None,
    admit: Callable[[PeerRecord], str | None] | None = None,
    middleware: str = "native",
) -> JobNeeds:
    """The job's needs: flags win over the workflow's `grid:` section."""
    spec = workflow.grid
    texts = [t for t in (spec.require, require) if t]
    lo, hi = workers or (spec.workers_min or 1, spec.workers_max or min(8, len(workflow.tasks)))
    return JobNeeds(
        grid=grid,
        require=Requirement.parse(" and ".join(f"({t})" for t in texts))
        if texts
        else Requirement.everything(),
        max_cost=max_cost if max_cost is not None else spec.max_cost,
        workers_min=lo,
        workers_max=max(lo, hi),
        rank=spec.rank or "cost",
        admit=admit,
        middleware=middleware,
    )
