"""Worker credentials: what a coordinator admits, and what enrolment files hold."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bonjourgrid import credentials
from bonjourgrid.coordinator.recruit import JobNeeds, explain_shortage, select_candidates
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.errors import KeyStoreError
from bonjourgrid.keys import GridKey, Keypair, ephemeral_grid_key, init_grid_key
from bonjourgrid.requirements import Requirement
from tests.records import idle_peer

GRID = ephemeral_grid_key()


def record(identity: credentials.WorkerIdentity, **changes: object) -> PeerRecord:
    name = str(changes.pop("name", identity.name))
    fields: dict[str, object] = {
        "addresses": ("10.0.0.2",),
        "cpus": 4,
        "key": identity.keypair.public.decode(),
        "grid": GRID.fingerprint,
        "cred": identity.credential,
        **changes,
    }
    return idle_peer(name, **fields)


def refusal(check: credentials.CredentialCheck, peer: PeerRecord) -> str | None:
    return check.refusal(peer.name, peer.key, peer.cred)


def test_an_enrolled_worker_is_admitted_and_copies_of_its_record_are_not() -> None:
    check = credentials.CredentialCheck(GRID)
    lab12 = credentials.issue(GRID, "lab-12")
    assert refusal(check, record(lab12)) is None
    assert len(lab12.credential) == credentials.CREDENTIAL_CHARS  # one TXT value
    # An impostor copies the TXT: with its own key the signature does not cover it; under
    # another name neither. (With the real key it passes here, and fails the handshake.)
    own_key = Keypair.generate().public.decode()
    assert "did not issue" in (refusal(check, record(lab12, key=own_key)) or "")
    assert "did not issue" in (refusal(check, record(lab12, name="lab-13")) or "")
    assert "no worker credential" in (refusal(check, record(lab12, cred="")) or "")
    peer = record(lab12)
    assert "malformed" in (check.refusal(peer.name, peer.key, "A" * 85 + "*") or "")


def test_a_credential_of_another_grid_is_refused() -> None:
    other = ephemeral_grid_key()
    theirs = credentials.issue(other, "lab-12")
    check = credentials.CredentialCheck(GRID)
    assert "did not issue" in (refusal(check, record(theirs)) or "")


def test_a_revoked_worker_is_refused_and_a_re_enrolled_one_admitted() -> None:
    stolen = credentials.issue(GRID, "lab-12")
    check = credentials.CredentialCheck(GRID, revoked={stolen.keypair.public.decode()})
    assert "revoked" in (refusal(check, record(stolen)) or "")
    fresh = credentials.issue(GRID, "lab-12")
    assert refusal(check, record(fresh)) is None


def test_recruitment_rejects_peers_that_are_not_admitted_and_says_how_to_enroll() -> None:
    check = credentials.CredentialCheck(GRID)
    good = record(credentials.issue(GRID, "lab-12"))
    impostor = record(credentials.issue(GRID, "lab-13"), key=Keypair.generate().public.decode())
    needs = JobNeeds(
        grid=GRID.fingerprint,
        require=Requirement.everything(),
        workers_min=2,
        admit=lambda p: refusal(check, p),
    )
    selection = select_candidates([impostor, good], needs)
    assert selection.candidates == [good]
    assert selection.rejected["lab-13"].startswith("is not admitted")
    message = explain_shortage([impostor, good], selection, needs, granted=1)
    assert "bgrid keys enroll" in message


def test_only_a_desktop_with_the_grid_secret_can_enroll() -> None:
    with pytest.raises(KeyStoreError, match="secret half"):
        credentials.issue(GridKey(GRID.public, None), "lab-12")
    with pytest.raises(KeyStoreError, match="worker name"):
        credentials.issue(GRID, "lab 12; rm -rf /")


def test_enroll_join_revoke_round_trip(tmp_path: Path) -> None:
    admin, desk = tmp_path / "admin", tmp_path / "desk"
    grid = init_grid_key(admin)
    identity, token = credentials.enroll(grid, "lab-12", admin)
    assert token.startswith(credentials.TOKEN_PREFIX) and "\n" not in token

    path = credentials.join(credentials.parse_token(token), desk)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the worker's secret key
    loaded = credentials.load_identity(path)
    assert loaded == identity
    assert loaded.grid.public == grid.public and loaded.grid.secret is None
    assert (desk / "grid.key").is_file() and not (desk / "grid.key_secret").exists()

    assert credentials.enrolled(admin) == [("lab-12", identity.keypair.public.decode())]
    assert credentials.revoke("lab-12", admin) == [identity.keypair.public.decode()]
    assert credentials.revoke("lab-12", admin) == []  # once is enough
    assert credentials.load_revoked(admin) == {identity.keypair.public.decode()}
    with pytest.raises(KeyStoreError, match="--key"):
        credentials.revoke("lab-99", admin)


def test_join_refuses_a_token_of_another_grid_unless_forced(tmp_path: Path) -> None:
    desk = tmp_path / "desk"
    init_grid_key(desk)
    token = credentials.token(credentials.issue(GRID, "lab-12"))
    with pytest.raises(KeyStoreError, match="--force"):
        credentials.join(credentials.parse_token(token), desk)
    credentials.join(credentials.parse_token(token), desk, force=True)
    assert credentials.load_identity(desk / credentials.CREDENTIAL_FILE).name == "lab-12"


@pytest.mark.parametrize(
    "text",
    ["", "hello", credentials.TOKEN_PREFIX + "!!!", credentials.TOKEN_PREFIX + "e30="],
)
def test_a_damaged_token_is_refused_with_what_to_do(text: str) -> None:
    with pytest.raises(KeyStoreError, match=r"token|credential"):
        credentials.parse_token(text)


def test_a_missing_credential_file_says_how_to_enroll(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="bgrid keys enroll"):
        credentials.load_identity(tmp_path / "worker.cred")
    tampered = credentials.issue(GRID, "lab-12")
    other = Keypair.generate()
    assert other.secret is not None
    path = tmp_path / "worker.cred"
    path.write_text(
        tampered.to_json().replace(tampered.keypair.secret.decode(), other.secret.decode())
    )  # type: ignore[union-attr]
    with pytest.raises(KeyStoreError, match="damaged"):
        credentials.load_identity(path)
