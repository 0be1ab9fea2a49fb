"""A separate host on one machine: a network namespace joined to the root one by a veth pair.

A worker started in the namespace (``ip netns exec``) reaches a Redis bound to the root end's
address; taking that end down cuts the link, as a partition between two hosts would. Used by the
partition test and the nemesis run. Needs root and iproute2.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)


@dataclass
class Link:
    """A network namespace joined to the root namespace by a veth pair on a private /30."""

    netns: str
    host_if: str
    host_ip: str
    ns_ip: str

    @classmethod
    def make(cls, prefix: str = "titan") -> Link | None:
        """A new link, or None where namespaces cannot be made (not root, no iproute2, no veth)."""
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return None
        tag = uuid.uuid4().hex[:6]
        host_ip, ns_ip = _free_subnet()
        link = cls(f"{prefix}-{tag}", f"tl{tag}h", host_ip, ns_ip)
        ns_if = f"tl{tag}n"
        if _ip("netns", "add", link.netns).returncode != 0:
            return None
        steps = [
            ("link", "add", link.host_if, "type", "veth", "peer", "name", ns_if, "netns", link.netns),
            ("addr", "add", f"{host_ip}/30", "dev", link.host_if),
            ("link", "set", link.host_if, "up"),
            ("-n", link.netns, "addr", "add", f"{ns_ip}/30", "dev", ns_if),
            ("-n", link.netns, "link", "set", ns_if, "up"),
            ("-n", link.netns, "link", "set", "lo", "up"),
        ]
        for step in steps:
            if _ip(*step).returncode != 0:
                link.remove()
                return None
        return link

    def set(self, *, up: bool) -> None:
        """Cut (or restore) the link: the root-side end goes down, so the namespace hears nothing."""
        done = _ip("link", "set", self.host_if, "up" if up else "down")
        if done.returncode != 0:
            raise RuntimeError(f"ip link set {self.host_if}: {done.stderr.strip()}")

    def remove(self) -> None:
        """Delete both ends (deleting one removes the pair) and the namespace."""
        _ip("link", "del", self.host_if)
        _ip("netns", "del", self.netns)


def _free_subnet() -> tuple[str, str]:
    """Two addresses of a /30 under 10.77.0.0/16 that no interface here uses."""
    used = _ip("-o", "-4", "addr", "show").stdout
    while True:
        a, b = random.randrange(256), random.randrange(0, 256, 4)
        host, peer = f"10.77.{a}.{b + 1}", f"10.77.{a}.{b + 2}"
        if f"10.77.{a}.{b}" not in used and f" {host}/" not in used and f" {peer}/" not in used:
            return host, peer
