"""Register one service over mDNS and keep its TXT record current.

Interfaces: all of them by default (like Avahi); `--interface` / BGRID_INTERFACES restricts
mDNS to a comma-separated list of this machine's IPv4 addresses. IPv4 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import secrets
import socket
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psutil
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    ServiceNameAlreadyRegistered,
)
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from bonjourgrid.discovery.txt import SEQ_KEY
from bonjourgrid.errors import ConfigError

log = logging.getLogger(__name__)

# zeroconf.InterfacesType, which zeroconf does not export: addresses, or a choice.
InterfacesType = Sequence[str | int | tuple[tuple[str, int, int], int]] | InterfaceChoice
INTERFACES_ENV = "BGRID_INTERFACES"
# How long we listen for another owner of a name before claiming it. RFC 6762 §8.1 probes
# three times, 250 ms apart; python-zeroconf's own probe takes about 1.2 s, too slow for a
# peer that must be visible within 2 s of starting. Responders answer a unique record at
# once (§6), so on a LAN an owner answers well within this.
_NAME_PROBE_MS = 300
# On loopback only (`--interface 127.0.0.1`: the embedded local grid), every possible owner
# is a process of this host, whose answer needs no network: a short probe is enough, and
# `bgrid submit --local` does not wait the LAN's probe for each of its workers.
_LOOPBACK_PROBE_MS = 50
_MAX_RENAMES = 100
_MAX_LABEL_BYTES = 63

# The interfaces each AsyncZeroconf from open_zeroconf listens on, so an Advertiser
# knows which addresses to advertise without being told.
_interfaces_of: weakref.WeakKeyDictionary[AsyncZeroconf, InterfacesType] = (
    weakref.WeakKeyDictionary()
)


def _local_ipv4_addresses() -> list[str]:
    """Every IPv4 address of this host (of this network namespace), in interface order."""
    return [
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET
    ]


def resolve_interfaces(arg: str | None = None) -> InterfacesType:
    """The interfaces to use: `arg` (--interface), else $BGRID_INTERFACES, else all."""
    text = (arg if arg is not None else os.environ.get(INTERFACES_ENV, "")).strip()
    if text.lower() in ("", "all"):
        return InterfaceChoice.All
    local = _local_ipv4_addresses()
    chosen: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            address = str(ipaddress.IPv4Address(part))
        except ValueError:
            raise ConfigError(
                f"interface {part!r} is not an IPv4 address: give one of this machine's "
                f"addresses ({', '.join(local)}), several separated by commas, or 'all'"
            ) from None
        if address not in local:
            raise ConfigError(
                f"interface {address} is not an address of this machine: "
                f"use one of {', '.join(local)}, or 'all'"
            )
        if address not in chosen:
            chosen.append(address)
    return chosen


# What a desktop whose mDNS port another responder holds alone must change. Avahi does so
# with `disallow-other-stacks=yes` (python-zeroconf cannot bind 5353 next to it then).
MDNS_PORT_TAKEN = (
    "cannot listen for mDNS on UDP port 5353: another mDNS responder holds it alone "
    "(avahi-daemon with disallow-other-stacks=yes?); set disallow-other-stacks=no in "
    "/etc/avahi/avahi-daemon.conf and restart avahi (systemctl restart avahi-daemon), "
    "or stop avahi-daemon"
)


def open_zeroconf(interfaces: InterfacesType, one_shot: bool = False) -> AsyncZeroconf:
    """An IPv4-only AsyncZeroconf on these interfaces; call it from the running event loop.
    ConfigError (MDNS_PORT_TAKEN) when another responder holds UDP 5353 alone.

    `one_shot`: query from an ephemeral port and hear only direct answers (for snapshots:
    it cannot advertise, nor hear announcements).
    """
    try:
        zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only, unicast=one_shot)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:  # python-zeroconf's 56-line traceback, in one line
            raise ConfigError(MDNS_PORT_TAKEN) from None
        raise
    _interfaces_of[zc] = interfaces
    return zc


def advertised_addresses(interfaces: InterfacesType) -> list[str]:
    """The IPv4 addresses to put in our A records when listening on these interfaces."""
    if isinstance(interfaces, InterfaceChoice):
        candidates = [
            a for a in _local_ipv4_addresses() if not ipaddress.IPv4Address(a).is_loopback
        ]
        # Link-local addresses last: a routable address is the better first choice.
        candidates.sort(key=lambda a: ipaddress.IPv4Address(a).is_link_local)
        return candidates or ["127.0.0.1"]
    chosen = []
    for interface in interfaces:
        with contextlib.suppress(ValueError):
            if isinstance(interface, str):
                chosen.append(str(ipaddress.IPv4Address(interface)))
    if not chosen:
        raise ConfigError(f"no IPv4 address among the interfaces {interfaces!r}")
    return chosen


def _loopback_only(interfaces: InterfacesType) -> bool:
    """Whether these interfaces are loopback addresses only (nothing beyond this host)."""
    if isinstance(interfaces, InterfaceChoice) or not interfaces:
        return False
    try:
        return all(isinstance(i, str) and ipaddress.IPv4Address(i).is_loopback for i in interfaces)
    except ValueError:
        return False


def _ipv4(address: str) -> str:
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        raise ConfigError(f"{address!r} is not an IPv4 address to advertise") from None


def _check_instance_name(name: str) -> None:
    size = len(name.encode("utf-8", "replace"))
    # python-zeroconf does not escape dots: "a.b" would travel as two DNS labels.
    if not (0 < size <= _MAX_LABEL_BYTES and name.isprintable()) or "." in name:
        raise ConfigError(
            f"name {name[:80]!r} cannot be advertised: use 1-{_MAX_LABEL_BYTES} bytes of "
            "printable text without dots, e.g. the short host name"
        )
    if name != name.strip():
        raise ConfigError(f"name {name!r} cannot be advertised: remove the outer spaces")


def _candidate_names(name: str) -> Iterator[str]:
    """name, name-2, name-3, ..., each cut to fit one DNS label."""
    yield name
    for number in range(2, _MAX_RENAMES + 2):
        suffix = f"-{number}"
        base = name
        while len((base + suffix).encode()) > _MAX_LABEL_BYTES:
            base = base[:-1]
        yield base + suffix


class Advertiser:
    """Registers one service and keeps its TXT record current."""

    def __init__(
        self,
        zc: AsyncZeroconf,
        service_type: str,
        name: str,
        port: int,
        properties: Mapping[str, str],
        addresses: Sequence[str] | None = None,
    ) -> None:
        _check_instance_name(name)
        if addresses is not None:
            addresses = [_ipv4(address) for address in addresses]
        self._zc = zc
        self._type = service_type
        self._wanted_name = name
        self._port = port
        self._properties = dict(properties)
        self._addresses = addresses
        # Starts at random so a restarted daemon's first TXT differs from any its previous
        # life left in caches.
        self._seq = secrets.randbelow(1 << 31)
        self._info: AsyncServiceInfo | None = None
        self._broadcast: asyncio.Future[Any] | None = None

    @property
    def name(self) -> str:
        """The instance name in use: the one asked for, or `name-N` if that was taken."""
        if self._info is None:
            return self._wanted_name
        return self._info.get_name()

    @property
    def properties(self) -> dict[str, str]:
        """The TXT properties currently advertised (without the sequence number)."""
        return dict(self._properties)

    async def start(self) -> None:
        """Claim a free instance name and announce the service."""
        if self._info is not None:
            raise RuntimeError(f"{self.name} is already advertised")
        addresses = self._addresses
        if addresses is None:
            addresses = advertised_addresses(_interfaces_of.get(self._zc, InterfaceChoice.All))
        for candidate in _candidate_names(self._wanted_name):
            full_name = f"{candidate}.{self._type}"
            if await self._name_taken(full_name):
                log.info("%s is taken on the LAN, trying another name", full_name)
                continue
            info = self._service_info(full_name, addresses)
            try:
                # We probed above, and much faster than python-zeroconf would.
                announcing = await self._zc.async_register_service(
                    info, cooperating_responders=True
                )
            except ServiceNameAlreadyRegistered:
                continue  # another Advertiser on this instance claimed it meanwhile
            except BadTypeInNameException as err:
                raise ConfigError(f"{candidate!r} cannot be advertised: {err}") from None
            self._info = info
            self._broadcast = asyncio.ensure_future(announcing)
            log.debug("advertising %s at %s port %d", full_name, addresses, self._port)
            if info.decoded_properties != self._txt():
                await self._publish()  # update() was called while we registered
            return
        raise ConfigError(
            f"{self._wanted_name!r} and {_MAX_RENAMES} variants of it are all taken on this "
            f"LAN: choose another name"
        )

    async def update(self, properties: Mapping[str, str]) -> None:
        """Replace the TXT record in place; nothing is sent if it is unchanged."""
        new = dict(properties)
        if new == self._properties:
            return
        self._properties = new
        if self._info is not None:
            await self._publish()

    async def _publish(self) -> None:
        assert self._info is not None
        self._seq += 1
        info = self._service_info(self._info.name, self._info.parsed_addresses())
        # An older announcement still repeating would put the old TXT back on the air.
        self._cancel_broadcast()
        self._broadcast = asyncio.ensure_future(await self._zc.async_update_service(info))
        self._info = info

    async def stop(self) -> None:
        """Withdraw the service: peers see it go at once (goodbye packets)."""
        info, self._info = self._info, None
        self._cancel_broadcast()
        if info is None or self._zc.zeroconf.done:
            return
        goodbyes = await self._zc.async_unregister_service(info)
        await goodbyes

    async def _name_taken(self, full_name: str) -> bool:
        zeroconf = self._zc.zeroconf
        if zeroconf.registry.async_get_info_name(full_name.lower()) is not None:
            return True
        probe = AsyncServiceInfo(self._type, full_name)
        interfaces = _interfaces_of.get(self._zc, InterfaceChoice.All)
        wait_ms = _LOOPBACK_PROBE_MS if _loopback_only(interfaces) else _NAME_PROBE_MS
        # QM: a unicast reply could land in another process's socket on the shared port.
        await probe.async_request(zeroconf, wait_ms, question_type=DNSQuestionType.QM)
        return probe.port is not None  # somebody answered with an SRV record

    def _txt(self) -> dict[str, str]:
        return {**self._properties, SEQ_KEY: str(self._seq)}

    def _service_info(self, full_name: str, addresses: Sequence[str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            self._type,
            full_name,
            port=self._port,
            properties=self._txt(),
            # One host name per service: a goodbye for it never withdraws another
            # service's address records, even one in another process on this host.
            server=full_name,
            parsed_addresses=list(addresses),
        )

    def _cancel_broadcast(self) -> None:
        if self._broadcast is not None:
            self._broadcast.cancel()
            self._broadcast = None
