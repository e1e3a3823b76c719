"""Which peers a job recruits, in what order, and what the user is told when none fit."""

from __future__ import annotations

from bonjourgrid.coordinator.recruit import JobNeeds, explain_shortage, rank, select_candidates
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.requirements import Requirement

KEY = "rq}^nGw+LqRDFrs!]9pf0%u*WtlmKI0:J7F)b=5d"


def peer(
    name: str,
    *,
    cpus: int = 2,
    ram: int = 4096,
    cost: float = 0.0,
    state: str = "idle",
    grid: str = "g1",
) -> PeerRecord:
    return PeerRecord(
        name=name,
        addresses=("10.0.0.1",),
        port=5000,
        state=state,  # type: ignore[arg-type]
        job="other-job" if state == "reserved" else None,
        cpus=cpus,
        ram=ram,
        disk=1000,
        cost=cost,
        arch="x86_64",
        os="linux",
        mw=("native",),
        key=KEY,
        grid=grid,
    )


def needs(require: str = "", **kw: object) -> JobNeeds:
    return JobNeeds(grid="g1", require=Requirement.parse(require), **kw)  # type: ignore[arg-type]


def test_candidates_are_ranked_by_cost_then_cpus() -> None:
    peers = [
        peer("pricey", cost=2.0, cpus=16),
        peer("cheap-small", cost=0.1, cpus=1),
        peer("cheap-big", cost=0.1, cpus=8),
    ]
    chosen = select_candidates(peers, needs()).candidates
    assert [p.name for p in chosen] == ["cheap-big", "cheap-small", "pricey"]


def test_requirements_cost_state_and_grid_filter_peers_with_reasons() -> None:
    peers = [
        peer("ok", ram=8192),
        peer("small", ram=1024),
        peer("dear", ram=8192, cost=5.0),
        peer("taken", ram=8192, state="reserved"),
        peer("alien", ram=8192, grid="g2"),
    ]
    selection = select_candidates(peers, needs("ram>=4GiB", max_cost=1.0))
    assert [p.name for p in selection.candidates] == ["ok"]
    assert selection.rejected["small"] == "does not satisfy ram>=4GiB (it has 1.0 GiB)"
    assert "max 1" in selection.rejected["dear"]
    assert "other-job" in selection.rejected["taken"]
    assert "another grid" in selection.rejected["alien"]


def test_a_rejected_peer_is_told_the_clause_it_fails_as_condor_q_better_analyze() -> None:
    seen = [peer("small", cpus=8, ram=4096)]
    n = needs("Cpus>=4 and Memory>=8G")
    text = explain_shortage(seen, select_candidates(seen, n), n, granted=0)
    assert "  small: does not satisfy ram>=8G (it has 4.0 GiB)" in text


def test_the_user_is_told_when_every_peer_serves_another_grid() -> None:
    seen = [peer("a", grid="g2"), peer("b", grid="g2")]
    n = needs()
    text = explain_shortage(seen, select_candidates(seen, n), n, granted=0)
    assert "another grid" in text and "g2" in text and "bgrid keys show" in text


def test_the_user_is_told_when_no_peer_answers() -> None:
    n = needs()
    text = explain_shortage([], select_candidates([], n), n, granted=0)
    assert "no BonjourGrid peer answered" in text and "--local" in text


def names(peers: list[PeerRecord]) -> list[str]:
    return [p.name for p in peers]


def test_at_equal_cost_the_peer_caching_more_of_the_job_goes_first() -> None:
    cached = {"warm": 3 << 20, "lukewarm": 1 << 20}
    peers = [peer("cold", cpus=16), peer("lukewarm", cpus=8), peer("warm", cpus=1)]
    ranked = rank(peers, needs(), lambda p: cached.get(p.name, 0))
    # Cached bytes outweigh cpus: what a peer holds need not move again.
    assert names(ranked) == ["warm", "lukewarm", "cold"]


def test_a_cheaper_peer_beats_one_caching_more() -> None:
    cached = {"warm-dear": 1 << 30}
    peers = [peer("warm-dear", cost=1.0, cpus=8), peer("cold-cheap", cost=0.5, cpus=1)]
    ranked = rank(peers, needs(), lambda p: cached.get(p.name, 0))
    assert names(ranked) == ["cold-cheap", "warm-dear"]


def test_ranking_by_cpus_puts_cost_then_cached_bytes_after_cpus() -> None:
    cached = {"warm-small": 1 << 30, "warm-dear": 1 << 30, "warm": 1 << 20}
    peers = [
        peer("warm-small", cpus=2),
        peer("warm-dear", cpus=8, cost=1.0),
        peer("cold", cpus=8),
        peer("warm", cpus=8),
    ]
    ranked = rank(peers, needs(rank="cpus"), lambda p: cached.get(p.name, 0))
    assert names(ranked) == ["warm", "cold", "warm-dear", "warm-small"]


def test_ties_are_broken_by_name_and_the_input_list_is_left_alone() -> None:
    peers = [peer("b"), peer("c"), peer("a")]
    assert names(rank(peers, needs(), lambda p: 0)) == ["a", "b", "c"]
    assert names(rank(peers, needs(rank="cpus"))) == ["a", "b", "c"]
    assert names(peers) == ["b", "c", "a"]


def test_select_candidates_ranks_as_before_without_cache_knowledge() -> None:
    peers = [
        peer("pricey-big", cost=2.0, cpus=16),
        peer("cheap-small", cost=0.1, cpus=1),
        peer("cheap-big-b", cost=0.1, cpus=8),
        peer("cheap-big-a", cost=0.1, cpus=8),
    ]
    by_cost = select_candidates(peers, needs()).candidates
    assert names(by_cost) == ["cheap-big-a", "cheap-big-b", "cheap-small", "pricey-big"]
    assert by_cost == rank(peers, needs())
    by_cpus = select_candidates(peers, needs(rank="cpus")).candidates
    assert names(by_cpus) == ["pricey-big", "cheap-big-a", "cheap-big-b", "cheap-small"]
