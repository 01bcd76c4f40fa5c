"""Policy text -> validated :class:`Policy`, with located errors.

The language is Tailscale's policy file with headscale's accepted subset
(hscontrol/policy/v2/types.go): field names match case-insensitively and
unknown fields are refused, so a typo never silently weakens a policy.
Every problem found is reported with its JSON path and line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection
from typing import Any

from .errors import PolicyError
from .hujson import LocDict, LocList, parse_hujson
from .ipset import EMPTY, INTERNET, IPSet
from .model import (
    ACL,
    ALL_PORTS,
    AUTOGROUP_DANGER_ALL,
    AUTOGROUP_INTERNET,
    AUTOGROUP_MEMBER,
    AUTOGROUP_NONROOT,
    AUTOGROUP_SELF,
    AUTOGROUP_TAGGED,
    AUTOGROUPS,
    IDP_GROUP_PREFIX,
    Alias,
    AliasKind,
    AutoApprovers,
    Destination,
    Grant,
    IPRule,
    NodeAttr,
    Policy,
    PolicyTest,
    PortRange,
    SSHRule,
    SSHTest,
)

# IANA numbers for the protocol names Tailscale accepts in "proto".
PROTOCOLS = {
    "icmp": 1,
    "igmp": 2,
    "ipv4": 4,
    "ip-in-ip": 4,
    "tcp": 6,
    "egp": 8,
    "igp": 9,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "sctp": 132,
    "fc": 133,
}
# Only these carry ports; any other protocol must use "*" (headscale
# validateProtocolPortCompatibility, Tailscale's own check).
_PORTED = {6, 17, 132}

_ACL_SRC_AUTOGROUPS = (AUTOGROUP_MEMBER, AUTOGROUP_TAGGED, AUTOGROUP_DANGER_ALL)
_ACL_DST_AUTOGROUPS = (AUTOGROUP_INTERNET, AUTOGROUP_MEMBER, AUTOGROUP_TAGGED, AUTOGROUP_SELF)
_SSH_SRC_AUTOGROUPS = (AUTOGROUP_MEMBER, AUTOGROUP_TAGGED)
_SSH_DST_AUTOGROUPS = (AUTOGROUP_MEMBER, AUTOGROUP_TAGGED, AUTOGROUP_SELF)

# Tailscale caps an SSH check period at a week (headscale SSHCheckPeriodMax).
_CHECK_PERIOD_MAX_S = 7 * 24 * 3600
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}

# Top-level sections Tailscale has but homescale does not implement: refused
# with a reason instead of "unknown field", so nobody thinks they were applied.
_UNSUPPORTED_SECTIONS = {
    "postures": "device posture is not supported by homescale (no posture integration)",
    "derpmap": "derpMap belongs in the server configuration (derp.*), not the policy",
    "disableipv4": "disableIPv4 is not supported by homescale",
    "onecgnatroute": "OneCGNATRoute is not supported by homescale",
}


def _path(base: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{base}.{key}" if base else key
    return f'{base}["{key}"]'


def _go_duration_seconds(text: str) -> float | None:
    """Parse a Go time.Duration string ("1h30m"); None when malformed."""
    if not text:
        return None
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if not m:
            return None
        total += float(m.group(1)) * _DURATION_UNIT_S[m.group(2)]
        pos = m.end()
    return sign * total if body else None


def _go_duration(seconds: float) -> str:
    """Whole seconds as Go's time.Duration.String() writes them ("-1m0s", "200h0m0s")."""
    sign = "-" if seconds < 0 else ""
    total = int(abs(seconds))
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{sign}{h}h{m}m{sec}s"
    if m:
        return f"{sign}{m}m{sec}s"
    return f"{sign}{sec}s"


def parse_alias(text: str) -> Alias:
    """Classify an alias the way headscale's parseAlias does.

    An IP or CIDR first, then ``*``, then by shape: ``@`` is a user,
    ``group:``/``tag:``/``autogroup:`` prefixes, and a bare word is a host.
    Raises ValueError with a user-facing reason.
    """
    try:
        net = ipaddress.ip_network(text, strict=False) if text else None
    except ValueError:
        net = None
    if net is not None:
        return Alias(AliasKind.PREFIX, text, net)
    if text == "*":
        return Alias(AliasKind.WILDCARD, "*")
    if text.startswith("user:"):
        local, at, domain = text[len("user:") :].rpartition("@")
        if local == "*" and at and domain:
            return Alias(AliasKind.USER_DOMAIN, text)
        if not at:
            raise ValueError(f"{text!r} is not a valid user (user:name@domain or user:*@domain)")
        return Alias(AliasKind.USER, text[len("user:") :])
    if text.startswith("ipset:"):
        if len(text) == len("ipset:"):
            raise ValueError("an IP set needs a name after 'ipset:'")
        return Alias(AliasKind.IPSET, text)
    if "@" in text:
        return Alias(AliasKind.USER, text)
    if text.startswith("group:"):
        return Alias(AliasKind.GROUP, text)
    if text.startswith("tag:"):
        return Alias(AliasKind.TAG, text)
    if text.startswith("autogroup:"):
        if text not in AUTOGROUPS:
            raise ValueError(f"unknown autogroup {text!r}; homescale knows {', '.join(AUTOGROUPS)}")
        return Alias(AliasKind.AUTOGROUP, text)
    if text and ":" not in text:
        return Alias(AliasKind.HOST, text)
    raise ValueError(
        f"{text!r} is not a valid alias (user@, group:, tag:, host, IP/CIDR, autogroup: or *)"
    )


def split_destination(text: str) -> tuple[str, str]:
    """Split ``alias:ports`` at the last colon; ``[v6]:port`` is accepted."""
    if text.startswith("["):
        close = text.find("]")
        host = text[1:close] if close > 0 else ""
        try:
            is_v6 = ipaddress.ip_address(host).version == 6
        except ValueError:
            is_v6 = False
        if not is_v6 or text[close + 1 : close + 2] not in (":", "/"):
            raise ValueError("square brackets are only valid around an IPv6 address")
        text = host + text[close + 1 :]
    idx = text.rfind(":")
    if idx <= 0 or idx == len(text) - 1:
        raise ValueError(f"{text!r} must be alias:ports (e.g. tag:server:22 or *:*)")
    return text[:idx], text[idx + 1 :]


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """``*``, ``22``, ``80-443`` or a comma list of those; ValueError otherwise."""
    if text == "*":
        return (ALL_PORTS,)
    out: list[PortRange] = []
    for part in text.split(","):
        bounds = part.split("-")
        if len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            # Tailscale has no named ports: "tag:server:ssh" is refused (acl-err07).
            raise ValueError(
                f'port range "{part}": invalid first integer (use a number, a range like 80-443, or *)'
            )
        nums = [int(b) for b in bounds]
        if any(n > 65535 for n in nums):
            raise ValueError(f"port {part!r} is out of range (0-65535)")
        first, last = nums[0], nums[-1]
        if first > last:
            raise ValueError(f"port range {part!r} is inverted")
        if len(nums) == 1 and first == 0:
            raise ValueError(
                f"port range \"{part}\": first port must be >0, or use '*' for wildcard"
            )
        out.append(PortRange(first, last))
    return tuple(out)


def parse_proto(text: str) -> tuple[int, ...]:
    """A protocol name or IANA number -> IPProto list; "" is the default set."""
    lowered = text.strip().lower()
    if lowered == "":
        return ()
    if lowered in PROTOCOLS:
        return (PROTOCOLS[lowered],)
    if lowered == "*":
        raise ValueError('proto "*" is not known; omit proto for TCP/UDP/ICMP, or name one')
    if not lowered.isdigit() or (len(lowered) > 1 and lowered.startswith("0")) or lowered == "0":
        raise ValueError(
            f"unknown protocol {text!r}: use a name (tcp, udp, icmp, ...) or a number 1-255"
        )
    number = int(lowered)
    if number > 255:
        raise ValueError(f"protocol number {number} is out of range (1-255)")
    return (number,)


class _Reader:
    """Walks the parsed HuJSON, collecting located problems."""

    def __init__(self, source: str, localpart_domains: Collection[str] | None) -> None:
        self.source = source
        self.problems: list[PolicyError] = []
        # Compared as written: Tailscale refused localpart:*@EXAMPLE.COM for
        # a tailnet on example.com (ssh-e1).
        self.localpart_domains = None if localpart_domains is None else set(localpart_domains)

    def problem(self, path: str, line: int | None, message: str) -> None:
        self.problems.append(PolicyError(message, path=path, line=line, source=self.source))

    # -- shapes -------------------------------------------------------------
    def fields(
        self, obj: Any, path: str, line: int | None, known: Collection[str], what: str
    ) -> dict[str, tuple[Any, str, int | None]] | None:
        """Map canonical field name -> (value, path, line), refusing unknowns.

        Names match case-insensitively (Tailscale and headscale both do).
        """
        if not isinstance(obj, LocDict):
            self.problem(path, line, f"{what} must be an object")
            return None
        canon = {k.lower(): k for k in known}
        out: dict[str, tuple[Any, str, int | None]] = {}
        for key, value in obj.items():
            sub = _path(path, key)
            kline = obj.lines.get(key)
            if key.startswith("#"):
                # headscale ignores "#"-prefixed metadata members in rules
                # (headscale-admin writes them); so do we.
                continue
            name = canon.get(key.lower())
            if name is None:
                self.problem(sub, kline, f"unknown field {key!r} in {what}")
                continue
            if name in out:
                self.problem(sub, kline, f"field {name!r} given twice (names are case-insensitive)")
                continue
            if value is None:
                # JSON null is the field left out, as Go decodes it
                # (ssh-acceptenv-null, ssh-checkperiod-null, ssh-users-null).
                continue
            out[name] = (value, _path(path, name), kline)
        return out

    def strings(
        self, value: Any, path: str, line: int | None, what: str
    ) -> list[tuple[str, str, int | None]]:
        if not isinstance(value, LocList):
            self.problem(path, line, f"{what} must be a list of strings")
            return []
        out: list[tuple[str, str, int | None]] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.problem(_path(path, i), value.lines[i], f"{what} entries must be strings")
                continue
            out.append((item, _path(path, i), value.lines[i]))
        return out

    def string(self, value: Any, path: str, line: int | None, what: str) -> str | None:
        if not isinstance(value, str):
            self.problem(path, line, f"{what} must be a string")
            return None
        return value


def parse_policy(
    text: str,
    source: str = "<policy>",
    *,
    localpart_domains: Collection[str] | None = None,
) -> Policy:
    """Parse and validate a policy file; raises PolicyError naming path and line.

    ``localpart_domains``: the tailnet's own mail domains. When given, SSH
    ``localpart:*@<domain>`` users must use one of them, as Tailscale
    requires; when None (no configured domain), any domain is accepted, as
    headscale does.

    This validates the policy alone; its ``tests`` need the tailnet and run
    in :func:`run_policy_tests` (``compile_policy`` runs them).
    """
    doc = parse_hujson(text, source)
    r = _Reader(source, localpart_domains)
    policy = _build(doc, r)
    if r.problems:
        first, *rest = r.problems
        raise PolicyError(
            first.message, path=first.path, line=first.line, source=source, others=rest
        )
    assert policy is not None
    return policy


def _build(doc: Any, r: _Reader) -> Policy | None:
    known = [
        "groups",
        "hosts",
        "tagOwners",
        "acls",
        "grants",
        "ssh",
        "autoApprovers",
        "tests",
        "randomizeClientPort",
        *("nodeAttrs", "postures", "ipsets", "derpMap", "sshTests", "disableIPv4", "OneCGNATRoute"),
    ]
    top = r.fields(doc, "", getattr(doc, "line", 1), known, "the policy")
    if top is None:
        return None
    for name, (_, path, line) in top.items():
        if name.lower() in _UNSUPPORTED_SECTIONS:
            r.problem(path, line, _UNSUPPORTED_SECTIONS[name.lower()])

    groups = _groups(r, *top.get("groups", (LocDict(), "groups", None)))
    hosts = _hosts(r, *top.get("hosts", (LocDict(), "hosts", None)))
    ctx = _Context(r, groups, hosts, set())
    if "ipsets" in top:
        ctx.ipsets = _ipsets(ctx, *top["ipsets"])
    # Tag names first, so owners, ACLs and SSH rules can refer to any tag.
    raw_owners = top.get("tagOwners", (LocDict(), "tagOwners", None))
    if isinstance(raw_owners[0], LocDict):
        ctx.tags.update(k for k in raw_owners[0] if k.startswith("tag:"))
    tag_owners = _tag_owners(ctx, *raw_owners)

    acls = None
    if "acls" in top:
        acls = tuple(a for a in _list(ctx, top["acls"], "acls", _acl) if a)
    grants = None
    if "grants" in top:
        grants = tuple(g for g in _list(ctx, top["grants"], "grants", _grant) if g)
    ssh = ()
    if "ssh" in top:
        ssh = tuple(s for s in _list(ctx, top["ssh"], "ssh", _ssh) if s)
    approvers = AutoApprovers()
    if "autoApprovers" in top:
        approvers = _auto_approvers(ctx, *top["autoApprovers"])
    tests = ()
    if "tests" in top:
        tests = tuple(t for t in _list(ctx, top["tests"], "tests", _test) if t)
    ssh_tests = ()
    if "sshTests" in top:
        ssh_tests = tuple(t for t in _list(ctx, top["sshTests"], "sshTests", _ssh_test) if t)
    node_attrs = ()
    if "nodeAttrs" in top:
        node_attrs = tuple(a for a in _list(ctx, top["nodeAttrs"], "nodeAttrs", _node_attr) if a)
    randomize = False
    if "randomizeClientPort" in top:
        value, path, line = top["randomizeClientPort"]
        if not isinstance(value, bool):
            r.problem(path, line, "randomizeClientPort must be true or false")
        randomize = bool(value)
    return Policy(
        groups=groups,
        hosts=hosts,
        tag_owners=tag_owners,
        acls=acls,
        grants=grants,
        ssh=ssh,
        auto_approvers=approvers,
        tests=tests,
        ssh_tests=ssh_tests,
        node_attrs=node_attrs,
        ipsets=ctx.ipsets,
        randomize_client_port=randomize,
        source=r.source,
    )


class _Context:
    def __init__(
        self, r: _Reader, groups: dict[str, tuple[str, ...]], hosts: dict[str, Any], tags: set[str]
    ) -> None:
        self.r = r
        self.groups = groups
        self.hosts = hosts
        self.tags = tags
        self.ipsets: dict[str, IPSet] = {}

    def alias(self, text: str, path: str, line: int | None, role: str = "") -> Alias | None:
        """Parse an alias and check that what it names is defined.

        ``role`` ("src" or "dst") words an undefined tag as Tailscale does.

        Surrounding whitespace is ignored, as Tailscale does
        (ssh-src-leading-whitespace, ssh-dst-trailing-whitespace).
        """
        try:
            alias = parse_alias(text.strip())
        except ValueError as exc:
            self.r.problem(path, line, str(exc))
            return None
        if alias.kind is AliasKind.GROUP and alias.name not in self.groups:
            self.r.problem(path, line, f'group "{alias.name}" is not defined in groups')
            return None
        if alias.kind is AliasKind.TAG and alias.name not in self.tags:
            where = {"src": "src=", "dst": f'dst="{text.strip()}": '}.get(role, "")
            self.r.problem(
                path, line, f'{where}tag not found: "{alias.name}" (define it in tagOwners)'
            )
            return None
        if alias.kind is AliasKind.HOST and alias.name not in self.hosts:
            self.r.problem(path, line, f'host "{alias.name}" is not defined in hosts')
            return None
        if alias.kind is AliasKind.IPSET and alias.name not in self.ipsets:
            self.r.problem(path, line, f'IP set "{alias.name}" is not defined in ipsets')
            return None
        if alias.kind is AliasKind.USER_DOMAIN:
            domain = alias.name.rpartition("@")[2]
            domains = self.r.localpart_domains
            if domains is not None and domain not in domains:
                # Tailscale's words (ssh-b4): only the tailnet's own domains.
                self.r.problem(
                    path,
                    line,
                    ("[ssh] " if role == "ssh" else "")
                    + f"{domain} is not associated with this Tailnet and cannot be used "
                    "in user:*@<domain> expressions",
                )
                return None
        return alias


def _list(
    ctx: _Context, entry: tuple[Any, str, int | None], what: str, each: Callable[..., Any]
) -> list[Any]:
    value, path, line = entry
    if not isinstance(value, LocList):
        ctx.r.problem(path, line, f"{what} must be a list")
        return []
    return [each(ctx, item, _path(path, i), value.lines[i]) for i, item in enumerate(value)]


def _groups(r: _Reader, value: Any, path: str, line: int | None) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, LocDict):
        r.problem(path, line, "groups must be an object")
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for name, members in value.items():
        gpath, gline = _path(path, name), value.lines[name]
        if not name.startswith("group:") or len(name) == len("group:"):
            r.problem(gpath, gline, f"group name {name!r} must start with 'group:'")
            continue
        users = []
        for member, mpath, mline in r.strings(members, gpath, gline, "group members"):
            if member.startswith("group:"):
                # Tailscale refuses groups inside groups (so no recursion can
                # exist); headscale too (ErrGroupMembersCannotBeRecursive).
                r.problem(
                    mpath,
                    mline,
                    f'groups["{name}"]: "{member}": group members cannot be recursive '
                    "(groups cannot contain groups)",
                )
            elif member.startswith(IDP_GROUP_PREFIX):
                # homescale's extension: everyone the identity provider put in that
                # group at their last sign-in (headscale issues #2366, #1121).
                if len(member) == len(IDP_GROUP_PREFIX):
                    r.problem(mpath, mline, f"group member {member!r} names no provider group")
                else:
                    users.append(member)
            elif "@" not in member:
                r.problem(
                    mpath,
                    mline,
                    f"group member {member!r} must be a user (user@ or user@example.com) "
                    f"or a provider group (oidc:<group>)",
                )
            else:
                users.append(member)
        out[name] = tuple(users)
    return out


def _hosts(r: _Reader, value: Any, path: str, line: int | None) -> dict[str, Any]:
    if not isinstance(value, LocDict):
        r.problem(path, line, "hosts must be an object")
        return {}
    out = {}
    for name, addr in value.items():
        hpath, hline = _path(path, name), value.lines[name]
        if "@" in name or ":" in name or not name:
            r.problem(hpath, hline, f"host name {name!r} is not valid (no '@' or ':')")
            continue
        try:
            out[name] = ipaddress.ip_network(addr, strict=False)
        except (ValueError, TypeError):
            r.problem(hpath, hline, f"host {name!r}: {addr!r} is not an IP address or CIDR")
    return out


def _tag_owners(
    ctx: _Context, value: Any, path: str, line: int | None
) -> dict[str, tuple[Alias, ...]]:
    r = ctx.r
    if not isinstance(value, LocDict):
        r.problem(path, line, "tagOwners must be an object")
        return {}
    out = {}
    for tag, owners in value.items():
        tpath, tline = _path(path, tag), value.lines[tag]
        rest = tag[len("tag:") :]
        if not tag.startswith("tag:") or not rest or not rest[0].isascii() or not rest[0].isalpha():
            r.problem(
                tpath,
                tline,
                f"tag names must start with a letter, after 'tag:' ({tag!r})",
            )
            continue
        parsed = []
        for owner, opath, oline in r.strings(owners, tpath, tline, "tag owners"):
            alias = ctx.alias(owner, opath, oline)
            if alias is None:
                continue
            # Tag owner cycles are accepted: Tailscale accepted
            # tagOwners {tag:a: [tag:b], tag:b: [tag:a]} (ssh-tag-owner-cycle).
            if alias.kind not in (AliasKind.USER, AliasKind.GROUP, AliasKind.TAG):
                if not alias.is_autogroup(AUTOGROUP_MEMBER):
                    r.problem(
                        opath, oline, f"{owner!r} cannot own a tag (use a user, group or tag)"
                    )
                    continue
            parsed.append(alias)
        out[tag] = tuple(parsed)
    return out


def _aliases(
    ctx: _Context, entry: tuple[Any, str, int | None], what: str, role: str | None = None
) -> list[tuple[Alias, str, int | None]]:
    out = []
    if role is None:
        role = what if what in ("src", "dst") else ""
    for text, path, line in ctx.r.strings(*entry, what):
        alias = ctx.alias(text, path, line, role)
        if alias is not None:
            out.append((alias, path, line))
    return out


def _check_src_autogroup(
    ctx: _Context, alias: Alias, path: str, line: int | None, allowed: tuple[str, ...]
) -> bool:
    if alias.kind is not AliasKind.AUTOGROUP or alias.name in allowed:
        return True
    if alias.name == AUTOGROUP_SELF:
        ctx.r.problem(
            path, line, '"autogroup:self" not valid on the src side of a rule; use it in dst'
        )
    elif alias.name == AUTOGROUP_INTERNET:
        ctx.r.problem(path, line, '"autogroup:internet" is only valid as a destination')
    else:
        ctx.r.problem(
            path,
            line,
            f'"{alias.name}" is not valid as a source here; use one of {", ".join(allowed)}',
        )
    return False


def _check_dst_autogroup(
    ctx: _Context, alias: Alias, path: str, line: int | None, allowed: tuple[str, ...]
) -> bool:
    if alias.kind is not AliasKind.AUTOGROUP or alias.name in allowed:
        return True
    if alias.name == AUTOGROUP_DANGER_ALL:
        ctx.r.problem(path, line, "cannot use autogroup:danger-all as a dst; use * or an IP range")
        return False
    ctx.r.problem(
        path,
        line,
        f'"{alias.name}" is not valid as a destination here; use one of {", ".join(allowed)}',
    )
    return False


def _self_sources_ok(
    ctx: _Context,
    srcs: list[tuple[Alias, str, int | None]],
    where: str,
    line: int | None,
    allow_wildcard: bool,
) -> None:
    """autogroup:self is per user: only user-like sources make sense.

    Tailscale refuses tags, autogroup:tagged, hosts and IPs as sources of an
    autogroup:self destination (acl-s04..s06, acl-sf03..sf08, acl-err08/09).
    ACLs allow "*" (narrowed per node); grants do not.
    """
    for alias, path, pline in srcs:
        ok = alias.kind in (AliasKind.USER, AliasKind.GROUP) or alias.is_autogroup(AUTOGROUP_MEMBER)
        ok = ok or (allow_wildcard and alias.kind is AliasKind.WILDCARD)
        if not ok:
            ctx.r.problem(
                path,
                pline,
                "autogroup:self can only be used with users, groups, or supported autogroups "
                f'("{alias.name}" is not one)',
            )


def _acl(ctx: _Context, item: Any, where: str, line: int | None) -> ACL | None:
    r = ctx.r
    f = r.fields(item, where, line, ["action", "src", "dst", "proto", "users", "ports"], "an ACL")
    if f is None:
        return None
    # "users" and "ports" are Tailscale's legacy names for src and dst.
    for old, new in (("users", "src"), ("ports", "dst")):
        if old in f:
            if new in f:
                r.problem(
                    f[old][1],
                    f[old][2],
                    f"give either {new!r} or its legacy name {old!r}, not both",
                )
            else:
                f[new] = f.pop(old)
    ok = True
    action = r.string(*f.get("action", (None, _path(where, "action"), line)), "action")
    if action is not None and action != "accept":
        # Tailscale policies are deny-by-default; it has no "deny" action (acl-err06).
        r.problem(
            _path(where, "action"),
            f["action"][2],
            f'action="{action}" is not supported; the only ACL action is "accept"',
        )
        ok = False
    protos: tuple[int, ...] = ()
    proto_name = ""
    if "proto" in f:
        text = r.string(*f["proto"], "proto")
        if text is not None:
            try:
                protos = parse_proto(text)
                proto_name = text
            except ValueError as exc:
                r.problem(f["proto"][1], f["proto"][2], str(exc))
                ok = False
    srcs = _aliases(ctx, f.get("src", (LocList(), _path(where, "src"), line)), "src")
    for src, path, pline in srcs:
        ok &= _check_src_autogroup(ctx, src, path, pline, _ACL_SRC_AUTOGROUPS)
    dsts: list[Destination] = []
    has_self = False
    for text, path, pline in r.strings(
        *f.get("dst", (LocList(), _path(where, "dst"), line)), "dst"
    ):
        try:
            name, port_text = split_destination(text)
            ports = parse_ports(port_text)
        except ValueError as exc:
            if text.count(":") == 1 and text.split(":")[0] in ("tag", "group", "autogroup"):
                # "tag:server" split as alias "tag" port "server": the
                # real mistake is the missing port.
                message = (
                    f'dst="{text}": port range "{text.split(":")[1]}": invalid first integer '
                    f"(write alias:ports, e.g. {text}:22 or {text}:*)"
                )
            else:
                message = f'dst="{text}": {exc}'
            r.problem(path, pline, message)
            ok = False
            continue
        alias = ctx.alias(name, path, pline, "dst")
        if alias is None:
            ok = False
            continue
        if not _check_dst_autogroup(ctx, alias, path, pline, _ACL_DST_AUTOGROUPS):
            ok = False
            continue
        if protos and protos[0] not in _PORTED and ports != (ALL_PORTS,):
            r.problem(path, pline, f"protocol {proto_name!r} has no ports; use {name}:*")
            ok = False
        has_self |= alias.is_autogroup(AUTOGROUP_SELF)
        dsts.append(Destination(alias, ports))
    if has_self:
        before = len(r.problems)
        _self_sources_ok(ctx, srcs, where, line, allow_wildcard=True)
        ok &= len(r.problems) == before
    if not ok:
        return None
    return ACL("accept", tuple(a for a, _, _ in srcs), tuple(dsts), protos, proto_name, where)


# tailscale.com capabilities a policy may grant; the others (and the
# companions drive-sharer / relay-target) are the server's to send.
_GRANTABLE_TAILSCALE_CAPS = frozenset(
    f"tailscale.com/cap/{name}"
    for name in ("drive", "relay", "webui", "kubernetes", "tsidp", "secrets")
)


def _plain_json(value: Any) -> Any:
    """LocDict/LocList -> dict/list: capability values are passed through as JSON."""
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _app(
    r: _Reader, value: Any, path: str, line: int | None, *, grant: bool
) -> dict[str, list[Any]] | None:
    """An ``app`` object: capability name -> list of JSON values."""
    if not isinstance(value, LocDict):
        r.problem(path, line, "app must be an object of capability name -> list of values")
        return None
    out: dict[str, list[Any]] = {}
    ok = True
    for name, values in value.items():
        cpath, cline = _path(path, name), value.lines[name]
        if grant and ("://" in name or "/" not in name.strip("/")):
            r.problem(cpath, cline, "capability name must have the form {domain}/{path}")
            ok = False
        elif grant and name.startswith("tailscale.com/") and name not in _GRANTABLE_TAILSCALE_CAPS:
            r.problem(cpath, cline, "capability name must not be in the tailscale.com domain")
            ok = False
        if not isinstance(values, LocList):
            r.problem(cpath, cline, f"capability {name!r} must map to a list of values")
            ok = False
            continue
        out[name] = _plain_json(values)
    return out if ok else None


def _grant(ctx: _Context, item: Any, where: str, line: int | None) -> Grant | None:
    r = ctx.r
    f = r.fields(item, where, line, ["src", "dst", "ip", "app", "via", "srcPosture"], "a grant")
    if f is None:
        return None
    ok = True
    if "srcPosture" in f:
        r.problem(
            f["srcPosture"][1],
            f["srcPosture"][2],
            "device posture (srcPosture) is not supported by homescale",
        )
        ok = False
    srcs = _aliases(ctx, f.get("src", (LocList(), _path(where, "src"), line)), "src")
    for alias, path, pline in srcs:
        ok &= _check_src_autogroup(ctx, alias, path, pline, _ACL_SRC_AUTOGROUPS)
    dsts = _aliases(ctx, f.get("dst", (LocList(), _path(where, "dst"), line)), "dst")
    for alias, path, pline in dsts:
        ok &= _check_dst_autogroup(ctx, alias, path, pline, _ACL_DST_AUTOGROUPS)
        if (
            alias.kind is AliasKind.PREFIX
            and alias.network is not None
            and alias.network.prefixlen == 0
        ):
            r.problem(
                path,
                pline,
                f'dst "{alias.network}": to allow all IP addresses, use "*" or "autogroup:internet"',
            )
            ok = False
    app: dict[str, list[Any]] = {}
    if "app" in f:
        parsed = _app(r, *f["app"], grant=True)
        if parsed is None:
            ok = False
        else:
            app = parsed
        if app and any(a.is_autogroup(AUTOGROUP_INTERNET) for a, _, _ in dsts):
            r.problem(f["app"][1], f["app"][2], "cannot use app grants with autogroup:internet")
            ok = False
    via: list[str] = []
    if "via" in f:
        for text, path, pline in r.strings(*f["via"], "via"):
            if not text.startswith("tag:"):
                r.problem(path, pline, "via can only be a tag")
                ok = False
            elif text not in ctx.tags:
                r.problem(path, pline, f'tag "{text}" not found (define it in tagOwners)')
                ok = False
            elif ctx.alias(text, path, pline) is None:
                ok = False
            else:
                via.append(text)
    rules = []
    for text, path, pline in r.strings(*f["ip"], "ip") if "ip" in f else ():
        try:
            if text == "*":
                rules.append(IPRule((), (ALL_PORTS,)))
                continue
            if ":" in text:
                proto_text, _, port_text = text.partition(":")
                protos = parse_proto(proto_text)
                if ":" in port_text:
                    raise ValueError(f"{text!r}: expected proto:ports")
            else:
                protos, port_text = (), text
            ports = parse_ports(port_text)
            if protos and protos[0] not in _PORTED and ports != (ALL_PORTS,):
                raise ValueError(f"protocol {proto_text!r} has no ports; use {proto_text}:*")
            rules.append(IPRule(protos, ports))
        except ValueError as exc:
            r.problem(path, pline, str(exc))
            ok = False
    if not rules and not app and ok:
        r.problem(where, line, "ip and app can not both be empty")
        return None
    if any(a.is_autogroup(AUTOGROUP_SELF) for a, _, _ in dsts):
        before = len(r.problems)
        _self_sources_ok(ctx, srcs, where, line, allow_wildcard=False)
        ok &= len(r.problems) == before
    if not ok:
        return None
    return Grant(
        tuple(a for a, _, _ in srcs),
        tuple(a for a, _, _ in dsts),
        tuple(rules),
        where,
        app,
        tuple(via),
    )


def _ssh(ctx: _Context, item: Any, where: str, line: int | None) -> SSHRule | None:
    r = ctx.r
    f = r.fields(
        item,
        where,
        line,
        ["action", "src", "dst", "users", "checkPeriod", "acceptEnv"],
        "an SSH rule",
    )
    if f is None:
        return None
    ok = True
    action = r.string(*f.get("action", ("", _path(where, "action"), line)), "action")
    apath, aline = _path(where, "action"), f.get("action", (None, None, line))[2]
    if action is not None and action.strip() == "":
        r.problem(apath, aline, 'action must be specified ("accept" or "check")')
        ok = False
    elif action is not None and action.strip() not in ("accept", "check"):
        # Case matters here: Tailscale refused "ACCEPT" (ssh-malformed-action-uppercase).
        r.problem(apath, aline, f'"{action}" is not a valid action; use "accept" or "check"')
        ok = False
    action = (action or "").strip()

    srcs = _aliases(ctx, f.get("src", (LocList(), _path(where, "src"), line)), "src", "ssh")
    for src, path, pline in srcs:
        if src.kind not in (
            AliasKind.USER,
            AliasKind.USER_DOMAIN,
            AliasKind.GROUP,
            AliasKind.TAG,
            AliasKind.AUTOGROUP,
        ):
            r.problem(
                path,
                pline,
                f'"{src.name}" is not valid as an SSH source; use users, groups, tags or autogroups',
            )
            ok = False
        else:
            ok &= _check_src_autogroup(ctx, src, path, pline, _SSH_SRC_AUTOGROUPS)
    dsts: list[tuple[Alias, str, int | None]] = []
    for text, path, pline in r.strings(
        *f.get("dst", (LocList(), _path(where, "dst"), line)), "dst"
    ):
        if text == "*":
            r.problem(
                path,
                pline,
                '"*" is not valid as an SSH destination; use autogroup:member, autogroup:tagged, tags or users',
            )
            ok = False
            continue
        alias = ctx.alias(text, path, pline)
        if alias is None:
            ok = False
        elif alias.kind is AliasKind.HOST:
            # Hosts are fine in ACL dst but Tailscale refuses them for SSH
            # (ssh-hosts-as-dst-multi-host-prefix).
            r.problem(
                path,
                pline,
                f'invalid dst "{alias.name}": hosts are not SSH destinations; use tags or users',
            )
            ok = False
        elif alias.kind not in (AliasKind.USER, AliasKind.TAG, AliasKind.AUTOGROUP):
            r.problem(
                path,
                pline,
                f'"{alias.name}" is not valid as an SSH destination; use tags, users or autogroups',
            )
            ok = False
        elif _check_dst_autogroup(ctx, alias, path, pline, _SSH_DST_AUTOGROUPS):
            dsts.append((alias, path, pline))
        else:
            ok = False
    ok &= _ssh_combination(ctx, srcs, dsts)

    users: list[str] = []
    upath = _path(where, "users")
    if "users" not in f:
        r.problem(upath, line, 'users must be specified (e.g. ["root"] or ["autogroup:nonroot"])')
        ok = False
    else:
        entries = r.strings(*f["users"], "users")
        if not entries and isinstance(f["users"][0], LocList) and not f["users"][0]:
            r.problem(upath, f["users"][2], "users must be specified (the list is empty)")
            ok = False
        for text, path, pline in entries:
            user = text.strip()
            if user in ("", "*"):
                # Tailscale's words first (sshtest-user-wildcard).
                r.problem(
                    path,
                    pline,
                    f'user "{user}" is not valid; name a login user, autogroup:nonroot or localpart:*@domain',
                )
                ok = False
                continue
            domain = _localpart_domain(user)
            if (
                domain is not None
                and ctx.r.localpart_domains is not None
                and domain not in ctx.r.localpart_domains
            ):
                r.problem(
                    path,
                    pline,
                    f"{domain} is not associated with this Tailnet and cannot be used "
                    "in user:*@<domain> expressions",
                )
                ok = False
            users.append(user)

    check_period = None
    if "checkPeriod" in f:
        value, path, pline = f["checkPeriod"]
        period = r.string(value, path, pline, "checkPeriod")
        if period is not None:
            if action != "check":
                r.problem(path, pline, 'checkPeriod is only valid with action "check"')
                ok = False
            elif period != "always":
                seconds = _go_duration_seconds(period)
                if seconds is None:
                    r.problem(
                        path,
                        pline,
                        f'time: invalid duration "{period}" (write a duration like 12h or 30m)',
                    )
                    ok = False
                elif seconds < 0:
                    r.problem(
                        path,
                        pline,
                        f"checkPeriod {_go_duration(seconds)} must be a positive duration",
                    )
                    ok = False
                elif seconds > _CHECK_PERIOD_MAX_S:
                    r.problem(
                        path, pline, f"checkPeriod {_go_duration(seconds)} is above the max (168h)"
                    )
                    ok = False
            check_period = period
    accept_env: list[str] = []
    if "acceptEnv" in f:
        for text, path, pline in r.strings(*f["acceptEnv"], "acceptEnv"):
            if text == "":
                r.problem(path, pline, "acceptEnv values cannot be empty")
                ok = False
            accept_env.append(text)
    if not ok:
        return None
    return SSHRule(
        action,
        tuple(a for a, _, _ in srcs),
        tuple(a for a, _, _ in dsts),
        tuple(users),
        check_period,
        tuple(accept_env),
        where,
    )


def _localpart_domain(user: str) -> str | None:
    """The domain of a canonical ``localpart:*@domain`` entry, else None.

    Malformed ``localpart:`` strings are literal user names (Tailscale
    accepted ``localpart:foo`` and sent it verbatim).
    """
    if not user.startswith("localpart:"):
        return None
    local, at, domain = user[len("localpart:") :].rpartition("@")
    if not at or local != "*" or not domain:
        return None
    return domain


def _ssh_combination(ctx: _Context, srcs: list[Any], dsts: list[Any]) -> bool:
    """Tailscale's SSH security model (headscale validateSSHSrcDstCombination).

    Tagged sources cannot reach user-owned devices; a user destination needs
    that same user as the only source (use autogroup:self otherwise).
    """
    tagged = any(a.kind is AliasKind.TAG or a.is_autogroup(AUTOGROUP_TAGGED) for a, _, _ in srcs)
    groupish = any(
        a.kind is AliasKind.GROUP or a.is_autogroup(AUTOGROUP_MEMBER) for a, _, _ in srcs
    )
    users = {a.name for a, _, _ in srcs if a.kind is AliasKind.USER}
    ok = True
    for alias, path, line in dsts:
        if alias.kind is AliasKind.USER:
            if tagged:
                ctx.r.problem(
                    path,
                    line,
                    f'tagged sources cannot SSH to "{alias.name}"\'s devices; use tags as destinations',
                )
                ok = False
            elif groupish or users != {alias.name}:
                ctx.r.problem(
                    path,
                    line,
                    f'destination "{alias.name}" needs that same user as the only source; use autogroup:self',
                )
                ok = False
        elif alias.is_autogroup(AUTOGROUP_SELF) and tagged:
            ctx.r.problem(path, line, "autogroup:self needs user or group sources, not tags")
            ok = False
        elif alias.is_autogroup(AUTOGROUP_MEMBER) and tagged:
            ctx.r.problem(
                path, line, "tagged sources cannot SSH to autogroup:member (user-owned devices)"
            )
            ok = False
    return ok


def _auto_approvers(ctx: _Context, value: Any, path: str, line: int | None) -> AutoApprovers:
    r = ctx.r
    f = r.fields(value, path, line, ["routes", "exitNode"], "autoApprovers")
    if f is None:
        return AutoApprovers()

    def approvers(entry: tuple[Any, str, int | None]) -> tuple[Alias, ...]:
        out = []
        for alias, apath, aline in _aliases(ctx, entry, "approvers"):
            if alias.kind not in (AliasKind.USER, AliasKind.GROUP, AliasKind.TAG):
                r.problem(
                    apath, aline, f'"{alias.name}" cannot approve routes; use users, groups or tags'
                )
                continue
            out.append(alias)
        return tuple(out)

    routes = {}
    if "routes" in f:
        rvalue, rpath, rline = f["routes"]
        if not isinstance(rvalue, LocDict):
            r.problem(rpath, rline, "routes must be an object of prefix -> approvers")
        else:
            for prefix, entry in rvalue.items():
                ppath, pline = _path(rpath, prefix), rvalue.lines[prefix]
                try:
                    net = ipaddress.ip_network(prefix, strict=False)
                except ValueError:
                    r.problem(ppath, pline, f"{prefix!r} is not a CIDR prefix")
                    continue
                routes[net] = approvers((entry, ppath, pline))
    exit_node = approvers(f["exitNode"]) if "exitNode" in f else ()
    return AutoApprovers(routes, exit_node)


class _TestReader(_Reader):
    """Problems in a ``tests`` entry: Tailscale reports them all as
    "test(s) failed" (policytest-malformed-*, -src-unknown-*, -port-shape-*)."""

    def __init__(self, outer: _Reader) -> None:
        super().__init__(outer.source, outer.localpart_domains)
        self.problems = outer.problems

    def problem(self, path: str, line: int | None, message: str) -> None:
        super().problem(path, line, f"test(s) failed: {message}")


def _test(ctx: _Context, item: Any, where: str, line: int | None) -> PolicyTest | None:
    r = _TestReader(ctx.r)
    ipsets = ctx.ipsets
    ctx = _Context(r, ctx.groups, ctx.hosts, ctx.tags)
    ctx.ipsets = ipsets
    f = r.fields(item, where, line, ["src", "proto", "accept", "deny"], "a test")
    if f is None:
        return None
    ok = True
    src = r.string(*f.get("src", (None, _path(where, "src"), line)), "src")
    if src is not None:
        alias = ctx.alias(src, f["src"][1], f["src"][2])
        if alias is None:
            ok = False
        elif alias.kind is AliasKind.AUTOGROUP and alias.name not in (
            AUTOGROUP_MEMBER,
            AUTOGROUP_TAGGED,
        ):
            r.problem(f["src"][1], f["src"][2], f'"{alias.name}" is not valid as a test source')
            ok = False
    else:
        ok = False
    proto_text = ""
    protos: tuple[int, ...] = ()
    if "proto" in f:
        proto_text = r.string(*f["proto"], "proto") or ""
        try:
            protos = parse_proto(proto_text)
        except ValueError as exc:
            r.problem(f["proto"][1], f["proto"][2], str(exc))
            ok = False
        if protos and protos[0] not in _PORTED:
            r.problem(f["proto"][1], f["proto"][2], "a test proto must be tcp, udp or sctp")
            ok = False
    lists: dict[str, list[str]] = {"accept": [], "deny": []}
    for name in lists:
        if name not in f:
            continue
        for text, path, pline in r.strings(*f[name], name):
            try:
                host, port_text = split_destination(text)
                ports = parse_ports(port_text)
            except ValueError as exc:
                r.problem(path, pline, str(exc))
                ok = False
                continue
            if len(ports) != 1 or ports[0].first != ports[0].last:
                r.problem(path, pline, f"{text!r}: a test names one port")
                ok = False
                continue
            alias = ctx.alias(host, path, pline)
            if alias is None:
                ok = False
                continue
            if (
                alias.is_autogroup(AUTOGROUP_INTERNET)
                or alias.is_autogroup(AUTOGROUP_SELF)
                or alias.is_autogroup(AUTOGROUP_NONROOT)
            ):
                r.problem(path, pline, f'"{alias.name}" is not valid as a test destination')
                ok = False
                continue
            net = (
                alias.network
                if alias.kind is AliasKind.PREFIX
                else ctx.hosts.get(alias.name)
                if alias.kind is AliasKind.HOST
                else None
            )
            if (net is not None and net.num_addresses > 1) or "/" in host:
                # Even a /32 is refused (policytest-allpass-grants-only-tag-src-prefix32-dst).
                r.problem(path, pline, f"{text!r}: a test destination is one host, not a range")
                ok = False
                continue
            lists[name].append(text)
    if not lists["accept"] and not lists["deny"] and ok:
        r.problem(where, line, 'a test needs "accept" or "deny" destinations')
        ok = False
    if not ok or src is None:
        return None
    return PolicyTest(
        src, proto_text, protos, tuple(lists["accept"]), tuple(lists["deny"]), where, line
    )


def _ipsets(ctx: _Context, value: Any, path: str, line: int | None) -> dict[str, IPSet]:
    """``ipsets``: name -> entries, each ``[add |remove ]<target>``, applied in order.

    Targets are IPs, CIDRs, ``a-b`` ranges, hosts (``host:name`` or bare),
    other IP sets and autogroup:internet -- address sets only: Tailscale
    refuses tags, users and groups, and circular references.
    """
    r = ctx.r
    if not isinstance(value, LocDict):
        r.problem(path, line, "ipsets must be an object")
        return {}
    raw: dict[str, tuple[Any, str, int | None]] = {}
    for name, entries in value.items():
        spath, sline = _path(path, name), value.lines[name]
        if not name.startswith("ipset:") or len(name) == len("ipset:"):
            r.problem(spath, sline, f"IP set name {name!r} must start with 'ipset:'")
            continue
        raw[name] = (entries, spath, sline)
    done: dict[str, IPSet] = {}

    def build(name: str, stack: tuple[str, ...]) -> IPSet:
        if name in done:
            return done[name]
        entries, spath, sline = raw[name]
        out = EMPTY
        for text, epath, eline in r.strings(entries, spath, sline, "IP set entries"):
            op, _, target = text.strip().partition(" ")
            if op not in ("add", "remove"):
                op, target = "add", text.strip()
            target = target.strip()
            if target.startswith("host:"):
                target = target[len("host:") :]
            part: IPSet | None = None
            if target in ctx.hosts:
                part = IPSet.of([ctx.hosts[target]])
            elif target == AUTOGROUP_INTERNET:
                part = INTERNET
            elif target.startswith("ipset:"):
                if target not in raw:
                    r.problem(epath, eline, f'IP set "{target}" is not defined in ipsets')
                elif target in stack or target == name:
                    r.problem(epath, eline, f'IP set "{target}" refers to itself (circular)')
                else:
                    part = build(target, (*stack, name))
            else:
                try:
                    part = IPSet.of([target])
                except ValueError:
                    r.problem(
                        epath,
                        eline,
                        f"{target!r} cannot be in an IP set: use IPs, CIDRs, ranges, hosts, "
                        "ipset: or autogroup:internet (not tags, users or groups)",
                    )
            if part is not None:
                out = out - part if op == "remove" else out | part
        done[name] = out
        return out

    for name in raw:
        build(name, ())
    return done


# Node attributes homescale cannot honour: refused rather than silently sent.
_UNSUPPORTED_NODE_ATTRS = {
    "funnel": "Funnel is not supported by homescale (no public ingress relay)",
}


def _node_attr(ctx: _Context, item: Any, where: str, line: int | None) -> NodeAttr | None:
    r = ctx.r
    f = r.fields(item, where, line, ["target", "attr", "app", "ipPool"], "a nodeAttrs entry")
    if f is None:
        return None
    ok = True
    if "ipPool" in f:
        reserved = [ipaddress.ip_network(n) for n in ("100.100.100.0/24", "100.115.92.0/23")]
        for text, path, pline in r.strings(*f["ipPool"], "ipPool"):
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                continue
            if any(net.overlaps(x) for x in reserved):
                r.problem(path, pline, f"IPPool({text}): network within reserved range")
        r.problem(f["ipPool"][1], f["ipPool"][2], "ipPool is not supported by homescale")
        ok = False
    if "target" not in f:
        r.problem(_path(where, "target"), line, "target must be specified")
        return None
    targets: list[tuple[Alias, str, int | None]] = []
    for text, path, pline in r.strings(*f["target"], "target"):
        if _is_undefined_host(ctx, text):
            # Tailscale's words (nodeattrs-error-e2-bad-target).
            r.problem(
                path, pline, f'"{text}": invalid address (not an IP, CIDR or host from hosts)'
            )
            ok = False
            continue
        alias = ctx.alias(text, path, pline)
        if alias is None:
            ok = False
        else:
            targets.append((alias, path, pline))
    for alias, path, pline in targets:
        if alias.kind is AliasKind.AUTOGROUP and alias.name not in (
            AUTOGROUP_MEMBER,
            AUTOGROUP_TAGGED,
        ):
            r.problem(
                path,
                pline,
                f'"{alias.name}" is not valid as a nodeAttrs target; use autogroup:member or autogroup:tagged',
            )
            ok = False
    attrs: list[str] = []
    if "attr" in f:
        for text, path, pline in r.strings(*f["attr"], "attr"):
            base = text.split("?", 1)[0]
            why = _UNSUPPORTED_NODE_ATTRS.get(text) or (
                _UNSUPPORTED_NODE_ATTRS["funnel"]
                if base == "https://tailscale.com/cap/funnel-ports"
                else None
            )
            if why:
                r.problem(path, pline, f"attribute {text!r}: {why}")
                ok = False
            elif not text:
                r.problem(path, pline, "attributes cannot be empty")
                ok = False
            else:
                attrs.append(text)
    app: dict[str, list[Any]] = {}
    if "app" in f:
        parsed = _app(r, *f["app"], grant=False)
        ok &= parsed is not None
        app = parsed or {}
    if not ok:
        return None
    return NodeAttr(tuple(a for a, _, _ in targets), tuple(attrs), app, where)


def _ssh_test(ctx: _Context, item: Any, where: str, line: int | None) -> SSHTest | None:
    """An ``sshTests`` entry. Tailscale reports most mistakes in one as
    "test(s) failed"; destinations it names precisely (sshtest-malformed-*)."""
    r = ctx.r
    failed = "test(s) failed"
    f = r.fields(item, where, line, ["src", "dst", "accept", "deny", "check"], "an SSH test")
    if f is None:
        return None
    ok = True
    src = None
    if "src" not in f or not isinstance(f["src"][0], str) or not f["src"][0].strip():
        r.problem(_path(where, "src"), line, f"{failed}: src must name a user, group or tag")
        ok = False
    else:
        src = ctx.alias(f["src"][0], f["src"][1], f["src"][2])
        ok &= src is not None
    dsts: list[Alias] = []
    for text, path, pline in r.strings(
        *f.get("dst", (LocList(), _path(where, "dst"), line)), "dst"
    ):
        try:
            alias = parse_alias(text.strip())
        except ValueError:
            alias = None
        if alias is not None and alias.kind is AliasKind.TAG and alias.name not in ctx.tags:
            r.problem(path, pline, f'SSH tests dst contains unknown tag "{alias.name}"')
            ok = False
            continue
        net = (
            alias.network
            if alias is not None and alias.kind is AliasKind.PREFIX
            else ctx.hosts.get(alias.name)
            if alias is not None and alias.kind is AliasKind.HOST
            else None
        )
        if (alias is not None and alias.is_autogroup(AUTOGROUP_INTERNET)) or (
            net is not None and net.num_addresses > 1
        ):
            r.problem(path, pline, f'SSH tests dst contains disallowed element "{text}"')
            ok = False
            continue
        if (
            net is not None
            and net.version == 6
            and alias is not None
            and alias.kind is AliasKind.PREFIX
        ):
            # Tailscale refuses a bare IPv6 address here (sshtest-malformed-dst-bare-ipv6).
            r.problem(path, pline, f"{failed}: {text!r}: name the node by tag, user or IPv4")
            ok = False
            continue
        checked = ctx.alias(text, path, pline)
        if checked is None:
            ok = False
            continue
        dsts.append(checked)
    if not dsts and ok:
        r.problem(_path(where, "dst"), line, f"{failed}: dst must name at least one destination")
        ok = False
    users: dict[str, list[str]] = {"accept": [], "check": [], "deny": []}
    for name in users:
        if name not in f:
            continue
        for text, path, pline in r.strings(*f[name], name):
            if text == "*":
                r.problem(path, pline, 'user "*" is not valid')
                ok = False
            elif not text.strip():
                r.problem(path, pline, f'{failed}: user "" is not valid')
                ok = False
            else:
                users[name].append(text.strip())
    if ok and not any(users.values()):
        r.problem(where, line, f"{failed}: an SSH test needs accept, check or deny users")
        ok = False
    if not ok or src is None:
        return None
    return SSHTest(
        src,
        tuple(dsts),
        tuple(users["accept"]),
        tuple(users["check"]),
        tuple(users["deny"]),
        where,
        line,
    )


def _is_undefined_host(ctx: _Context, text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        return parse_alias(text.strip()).kind is AliasKind.HOST and text.strip() not in ctx.hosts
    except ValueError:
        return False
