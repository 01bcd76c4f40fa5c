"""The policy's own ``tests``: assertions a policy must satisfy to be loaded.

Tailscale refuses a policy whose tests fail ("test(s) failed"); homescale
does the same and says which assertion failed. Tests need the tailnet (who
``alice@`` is, which IPs ``tag:server`` has), so they run against a compiled
snapshot, evaluating the receiving node's rules (autogroup:self included).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .compile import CompiledPolicy, FilterRule, compile_policy
from .errors import PolicyError
from .ipset import IPAddress, IPSet
from .model import AUTOGROUP_SELF, AliasKind, Policy, PolicyNode, PolicyTest, PolicyUser, SSHTest
from .parse import parse_alias, parse_policy, split_destination

# What a rule without IPProto allows (tailcfg: TCP, UDP, ICMP, ICMPv6).
_DEFAULT_PROTOS = frozenset({6, 17, 1, 58})


@dataclass(frozen=True)
class TestFailure:
    """One failed assertion, located at its test entry."""

    __test__ = False  # not a pytest test class, despite the name

    path: str
    line: int | None
    src: str
    dst: str
    expected: str  # "accept" or "deny"
    reason: str

    def error(self, source: str = "<policy>") -> PolicyError:
        return PolicyError(
            f"test failed: {self.src} -> {self.dst}: {self.reason}",
            path=self.path,
            line=self.line,
            source=source,
        )


def _allowed(
    compiled: CompiledPolicy, src: IPAddress, dst: IPAddress, port: int, protos: frozenset[int]
) -> bool:
    owner = next((n for n in compiled._nodes.values() if dst in n.addrs), None)
    rules = compiled.filter_for(owner.id) if owner is not None else _global_wire(compiled)
    for rule in rules:
        rule_protos = frozenset(rule.get("IPProto") or _DEFAULT_PROTOS)
        if not rule_protos & protos or not IPSet.of(rule["SrcIPs"]).contains(src):
            continue
        for entry in rule.get("DstPorts") or ():  # CapGrant rules carry no ports
            ports = entry["Ports"]
            if ports["First"] <= port <= ports["Last"] and IPSet.of([entry["IP"]]).contains(dst):
                return True
    return False


def _global_wire(compiled: CompiledPolicy) -> list[FilterRule]:
    """Rules for a destination that is no node (a host or subnet address)."""
    if compiled.allow_all:
        from .compile import ALLOW_ALL

        return ALLOW_ALL
    return [r.wire() for g in compiled._grants for r in g.rules]


def _sample(ips: IPSet) -> list[IPAddress]:
    """The addresses to try: all for node sets, the first of each range otherwise."""
    size = sum(hi - lo + 1 for lo, hi in ips.v4 + ips.v6)
    if size <= 1024:
        return ips.addresses()
    return [net.network_address for net in ips.prefixes()]


def _run_one(test: PolicyTest, compiled: CompiledPolicy) -> list[TestFailure]:
    src_ips = compiled.resolve(parse_alias(test.src))
    if not src_ips:
        return [
            TestFailure(
                test.where,
                test.line,
                test.src,
                "",
                "accept",
                f"source {test.src!r} has no addresses in this tailnet",
            )
        ]
    protos = frozenset(test.protos) or _DEFAULT_PROTOS
    failures = []
    for expected, dsts in (("accept", test.accept), ("deny", test.deny)):
        for dst in dsts:
            host, port_text = split_destination(dst)
            port = int(port_text)
            dst_ips = compiled.resolve(parse_alias(host))
            if not dst_ips:
                failures.append(
                    TestFailure(
                        test.where,
                        test.line,
                        test.src,
                        dst,
                        expected,
                        f"destination {host!r} has no addresses",
                    )
                )
                continue
            results = [
                _allowed(compiled, s, d, port, protos)
                for s in _sample(src_ips)
                for d in _sample(dst_ips)
            ]
            # accept: every source address reaches every destination
            # address; deny: none does (a partial allow fails both).
            if expected == "accept" and not all(results):
                failures.append(
                    TestFailure(
                        test.where,
                        test.line,
                        test.src,
                        dst,
                        expected,
                        "expected ALLOWED, got DENIED",
                    )
                )
            elif expected == "deny" and any(results):
                failures.append(
                    TestFailure(
                        test.where,
                        test.line,
                        test.src,
                        dst,
                        expected,
                        "expected DENIED, got ALLOWED",
                    )
                )
    return failures


def run_policy_tests(
    policy: Policy,
    users: Sequence[PolicyUser] | None = None,
    nodes: Sequence[PolicyNode] | None = None,
    *,
    compiled: CompiledPolicy | None = None,
) -> list[TestFailure]:
    """Evaluate the policy's ``tests``; an empty list means all passed."""
    if compiled is None:
        compiled = compile_policy(policy, users or (), nodes or ())
    failures: list[TestFailure] = []
    for test in policy.tests:
        failures += _run_one(test, compiled)
    return failures


def _ssh_allows(users: dict[str, str], login: str) -> bool:
    """Whether an SSHRule's sshUsers map lets ``login`` in (tailcfg semantics:
    an explicit entry wins; "*" covers everyone but root)."""
    if login in users:
        return users[login] != ""
    return login != "root" and users.get("*", "") != ""


def _run_ssh_test(test: SSHTest, compiled: CompiledPolicy) -> list[TestFailure]:
    src_ips = compiled.resolve(test.src)
    where, line, src = test.where, test.line, test.src.name

    def fail(dst: str, expected: str, reason: str) -> TestFailure:
        return TestFailure(where, line, src, dst, expected, reason)

    if not src_ips:
        return [fail("", "accept", f"source {src!r} resolved to no IP addresses")]
    failures: list[TestFailure] = []
    targets: list[tuple[str, list[int]]] = []
    for alias in test.dst:
        if alias.is_autogroup(AUTOGROUP_SELF):
            owners = compiled._user_ids(src) if test.src.kind is AliasKind.USER else set()
            ids = [nid for uid in owners for n in compiled._by_user.get(uid, []) for nid in [n.id]]
        else:
            ips = compiled.resolve(alias)
            ids = [nid for nid, n in compiled._nodes.items() if ips.contains_any(n.addrs)]
        if not ids:
            failures.append(
                fail(alias.name, "accept", f"dst alias {alias.name!r} resolved to no nodes")
            )
        targets.append((alias.name, ids))
    addrs = [a for n in compiled._nodes.values() for a in n.addrs if src_ips.contains(a)]
    for expected, logins in (("accept", test.accept), ("deny", test.deny), ("check", test.check)):
        for login in logins:
            for _label, ids in targets:
                for nid in ids:
                    rules = compiled.ssh_for(nid)
                    hits = []
                    for addr in addrs:
                        matching = [
                            r
                            for r in rules
                            if any(p.get("nodeIP") == str(addr) for p in r["principals"])
                            and _ssh_allows(r["sshUsers"], login)
                        ]
                        hits.append(
                            (
                                bool(matching),
                                any("holdAndDelegate" in r["action"] for r in matching),
                            )
                        )
                    name = compiled._nodes[nid].node.hostname
                    dst = f"{login}@{name}"
                    if expected == "accept" and not all(a for a, _ in hits):
                        failures.append(fail(dst, expected, "expected ALLOWED, got DENIED"))
                    elif expected == "deny" and any(a for a, _ in hits):
                        failures.append(fail(dst, expected, "expected DENIED, got ALLOWED"))
                    elif expected == "check" and not all(c for _, c in hits):
                        got = "ALLOWED via accept" if all(a for a, _ in hits) else "DENIED"
                        failures.append(
                            fail(dst, expected, f"expected ALLOWED via check, got {got}")
                        )
    return failures


def run_ssh_tests(policy: Policy, compiled: CompiledPolicy) -> list[TestFailure]:
    """Evaluate the policy's ``sshTests`` against the SSH rules each
    destination receives; an empty list means all passed."""
    failures: list[TestFailure] = []
    for test in policy.ssh_tests:
        failures += _run_ssh_test(test, compiled)
    return failures


def check_policy_tests(policy: Policy, compiled: CompiledPolicy, source: str = "<policy>") -> None:
    """Raise PolicyError unless every ``tests`` and ``sshTests`` entry passes.

    The message starts with Tailscale's own words, "test(s) failed", then
    names each failed assertion and where it is.
    """
    failures = run_policy_tests(policy, compiled=compiled) + run_ssh_tests(policy, compiled)
    if failures:
        first, *rest = (f.error(source) for f in failures)
        raise PolicyError(
            f"test(s) failed: {first.message}",
            path=first.path,
            line=first.line,
            source=source,
            others=rest,
        )


def load_policy(
    text: str,
    users: Sequence[PolicyUser],
    nodes: Sequence[PolicyNode],
    source: str = "<policy>",
    *,
    server_url: str = "",
    localpart_domains: Collection[str] | None = None,
) -> CompiledPolicy:
    """Parse, compile and test a policy: what ``policy set``/reload/check do.

    Raises PolicyError for an invalid policy or a failing test. Re-compiling
    after a membership change should use :func:`compile_policy` directly:
    like headscale, tests guard policy *writes*, so deleting a user cannot
    lock the server out of its stored policy.
    """
    policy = parse_policy(text, source, localpart_domains=localpart_domains)
    compiled = compile_policy(policy, users, nodes, server_url=server_url)
    check_policy_tests(policy, compiled, source)
    return compiled
