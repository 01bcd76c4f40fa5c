"""Parser and validation: every refusal names the JSON path and the line."""

from __future__ import annotations

import pytest

from netmap.policy import PolicyError, parse_hujson, parse_policy


def refuse(text: str, **kw: object) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, **kw)  # type: ignore[arg-type]
    return info.value


def test_hujson_comments_and_trailing_commas() -> None:
    doc = parse_hujson(
        """
        // a line comment
        {
          /* block
             comment */ "a": [1, 2, /* inline */ 3,],
          "b": {"c": "x // not a comment",},
        }
        """
    )
    assert doc == {"a": [1, 2, 3], "b": {"c": "x // not a comment"}}
    assert doc.lines["a"] == 5  # the text starts with a newline
    assert doc["b"].lines["c"] == 6


def test_hujson_error_has_line() -> None:
    err = refuse('{\n  "acls": [\n    {"action": "accept" "src": []}\n  ]\n}')
    assert err.line == 3
    assert "(line 3)" in str(err)


def test_undefined_group_located() -> None:
    text = """{
  "groups": {"group:ops": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["group:ops"], "dst": ["*:*"]},
    {"action": "accept",
     "src": ["group:nosuch"],
     "dst": ["*:22"]},
  ],
}"""
    err = refuse(text)
    assert err.path == "acls[1].src[0]"
    assert err.line == 6
    assert str(err) == 'acls[1].src[0]: group "group:nosuch" is not defined in groups (line 6)'


def test_source_name_prefixes_message() -> None:
    err = refuse(
        '{"acls": [{"action": "accept", "src": ["tag:x"], "dst": ["*:*"]}]}', source="policy.hujson"
    )
    assert str(err).startswith('policy.hujson: acls[0].src[0]: src=tag not found: "tag:x"')


@pytest.mark.parametrize(
    ("dst", "fragment"),
    [
        ("tag:server:ssh", 'port range "ssh": invalid first integer'),
        ("tag:server:70000", "out of range"),
        ("tag:server:443-80", "inverted"),
        ("tag:server", "write alias:ports"),
        ("autogroup:self", "write alias:ports"),
        ("nosuchhost:22", 'host "nosuchhost" is not defined'),
        ("autogroup:danger-all:*", "cannot use autogroup:danger-all as a dst"),
        ("autogroup:bogus:*", "unknown autogroup"),
    ],
)
def test_bad_destinations(dst: str, fragment: str) -> None:
    text = (
        '{"tagOwners": {"tag:server": ["alice@"]},\n "acls": [{"action": "accept", "src": ["*"],\n'
        ' "dst": ["' + dst + '"]}]}'
    )
    err = refuse(text)
    assert err.path == "acls[0].dst[0]"
    assert err.line == 3
    assert fragment in err.message


@pytest.mark.parametrize(
    ("proto", "fragment"),
    [
        ("bogus", "unknown protocol"),
        ("300", "out of range"),
        ("*", 'proto "*"'),
        ("06", "unknown protocol"),
    ],
)
def test_bad_protocols(proto: str, fragment: str) -> None:
    err = refuse(
        '{"acls": [{"action": "accept", "proto": "' + proto + '", "src": ["*"], "dst": ["*:*"]}]}'
    )
    assert err.path == "acls[0].proto"
    assert fragment in err.message


def test_ports_only_with_port_protocols() -> None:
    err = refuse('{"acls": [{"action": "accept", "proto": "icmp", "src": ["*"], "dst": ["*:22"]}]}')
    assert "has no ports" in err.message
    # icmp with "*" is fine, and numbers name the same protocol.
    policy = parse_policy(
        '{"acls": [{"action": "accept", "proto": "1", "src": ["*"], "dst": ["*:*"]}]}'
    )
    assert policy.acls is not None
    assert policy.acls[0].protos == (1,)


def test_deny_action_refused() -> None:
    err = refuse('{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}')
    assert err.path == "acls[0].action"
    assert "only ACL action" in err.message


def test_unknown_fields_refused_and_names_case_insensitive() -> None:
    err = refuse('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "prot": "tcp"}]}')
    assert err.path == "acls[0].prot"
    assert "unknown field" in err.message
    err = refuse('{"aclz": []}')
    assert err.path == "aclz"
    policy = parse_policy('{"ACLs": [{"Action": "accept", "SRC": ["*"], "Dst": ["*:80"]}]}')
    assert policy.acls is not None
    assert policy.acls[0].dst[0].ports[0].first == 80


def test_unsupported_section_says_so() -> None:
    err = refuse('{"postures": {}}')
    assert "not supported by homescale" in err.message
    err = refuse('{"nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]}')
    assert err.path == "nodeAttrs[0].attr[0]"
    assert "Funnel is not supported" in err.message
    err = refuse('{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "srcPosture": ["p"]}]}')
    assert err.path == "grants[0].srcPosture"


def test_groups_cannot_nest() -> None:
    err = refuse('{"groups": {"group:a": ["group:b"], "group:b": ["group:a"]}}')
    assert err.path.startswith('groups["group:')
    assert "groups cannot contain groups" in err.message
    assert len(err.others) == 1  # both groups are reported at once


def test_group_members_must_be_users() -> None:
    err = refuse('{"groups": {"group:a": ["alice"]}}')
    assert err.path == 'groups["group:a"][0]'


def test_tag_names_and_owners() -> None:
    err = refuse('{"tagOwners": {"tag:1x": ["alice@"]}}')
    assert "tag names must start with a letter" in err.message
    err = refuse('{"tagOwners": {"tag:a": ["group:none"]}}')
    assert err.path == 'tagOwners["tag:a"][0]'
    # Tags owning each other in a cycle are accepted, as Tailscale does.
    parse_policy('{"tagOwners": {"tag:a": ["tag:b"], "tag:b": ["tag:a"]}}')


def test_hosts_validated() -> None:
    err = refuse('{"hosts": {"db": "not-an-ip"}}')
    assert err.path == "hosts.db"
    policy = parse_policy('{"hosts": {"db": "10.0.0.5", "net": "10.1.0.0/16"}}')
    assert str(policy.hosts["net"]) == "10.1.0.0/16"


@pytest.mark.parametrize(
    ("src", "fragment"),
    [
        ("autogroup:self", "not valid on the src side"),
        ("autogroup:internet", "only valid as a destination"),
    ],
)
def test_autogroups_in_wrong_place(src: str, fragment: str) -> None:
    err = refuse('{"acls": [{"action": "accept", "src": ["' + src + '"], "dst": ["*:*"]}]}')
    assert err.path == "acls[0].src[0]"
    assert fragment in err.message


@pytest.mark.parametrize("src", ["tag:client", "autogroup:tagged", "100.64.0.1", "web"])
def test_self_destination_needs_user_sources(src: str) -> None:
    text = (
        '{"tagOwners": {"tag:client": ["alice@"]}, "hosts": {"web": "100.64.0.9"},'
        ' "acls": [{"action": "accept", "src": ["' + src + '"], "dst": ["autogroup:self:*"]}]}'
    )
    err = refuse(text)
    assert err.path == "acls[0].src[0]"
    assert "autogroup:self" in err.message


def test_self_destination_accepts_users_groups_member_and_wildcard() -> None:
    parse_policy(
        '{"groups": {"group:g": ["bob@"]}, "acls": [{"action": "accept",'
        ' "src": ["alice@", "group:g", "autogroup:member", "*"], "dst": ["autogroup:self:22"]}]}'
    )


@pytest.mark.parametrize(
    ("rule", "path", "fragment"),
    [
        (
            '{"action": "ACCEPT", "src": ["alice@"], "dst": ["tag:s"], "users": ["root"]}',
            "ssh[0].action",
            '"ACCEPT" is not a valid action',
        ),
        (
            '{"action": "", "src": ["alice@"], "dst": ["tag:s"], "users": ["root"]}',
            "ssh[0].action",
            "accept",
        ),
        (
            '{"action": "accept", "src": ["alice@"], "dst": ["tag:s"], "users": []}',
            "ssh[0].users",
            "empty",
        ),
        (
            '{"action": "accept", "src": ["alice@"], "dst": ["tag:s"], "users": ["root", "*"]}',
            "ssh[0].users[1]",
            "not valid",
        ),
        (
            '{"action": "accept", "src": ["alice@"], "dst": ["*"], "users": ["root"]}',
            "ssh[0].dst[0]",
            "not valid as an SSH destination",
        ),
        (
            '{"action": "accept", "src": ["alice@"], "dst": ["net"], "users": ["root"]}',
            "ssh[0].dst[0]",
            'invalid dst "net"',
        ),
        (
            '{"action": "check", "checkPeriod": "200h", "src": ["alice@"], "dst": ["tag:s"], "users": ["root"]}',
            "ssh[0].checkPeriod",
            "168h",
        ),
        (
            '{"action": "check", "checkPeriod": "abc", "src": ["alice@"], "dst": ["tag:s"], "users": ["root"]}',
            "ssh[0].checkPeriod",
            "duration",
        ),
        (
            '{"action": "accept", "checkPeriod": "1h", "src": ["alice@"], "dst": ["tag:s"], "users": ["root"]}',
            "ssh[0].checkPeriod",
            "only valid",
        ),
        (
            '{"action": "accept", "acceptEnv": [""], "src": ["alice@"], "dst": ["tag:s"], "users": ["root"]}',
            "ssh[0].acceptEnv[0]",
            "empty",
        ),
        (
            '{"action": "accept", "src": ["tag:s"], "dst": ["alice@"], "users": ["root"]}',
            "ssh[0].dst[0]",
            "tagged sources",
        ),
        (
            '{"action": "accept", "src": ["autogroup:member"], "dst": ["alice@"], "users": ["root"]}',
            "ssh[0].dst[0]",
            "autogroup:self",
        ),
        (
            '{"action": "accept", "src": ["tag:s"], "dst": ["autogroup:self"], "users": ["root"]}',
            "ssh[0].dst[0]",
            "not tags",
        ),
    ],
)
def test_ssh_rule_errors(rule: str, path: str, fragment: str) -> None:
    text = (
        '{"tagOwners": {"tag:s": ["alice@"]}, "hosts": {"net": "10.0.0.0/8"}, "ssh": ['
        + rule
        + "]}"
    )
    err = refuse(text)
    assert err.path == path
    assert fragment in err.message


def test_ssh_localpart_domain_checked_when_configured() -> None:
    text = '{"ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["localpart:*@other.org"]}]}'
    parse_policy(text)  # no configured domains: accepted, as headscale does
    err = refuse(text, localpart_domains=["example.com"])
    assert err.path == "ssh[0].users[0]"


def test_every_problem_reported() -> None:
    err = refuse(
        '{"acls": [{"action": "accept", "src": ["group:x", "tag:y"], "dst": ["nohost:1"]}]}'
    )
    paths = [err.path] + [e.path for e in err.others]
    assert paths == ["acls[0].src[0]", "acls[0].src[1]", "acls[0].dst[0]"]
    assert "and 2 more problem(s)" in str(err)


def test_auto_approvers_validated() -> None:
    err = refuse('{"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:none"]}}}')
    assert err.path == 'autoApprovers.routes["10.0.0.0/8"][0]'
    err = refuse('{"autoApprovers": {"routes": {"nope": ["alice@"]}}}')
    assert "not a CIDR" in err.message


def test_legacy_users_ports_names() -> None:
    policy = parse_policy(
        '{"acls": [{"action": "accept", "users": ["alice@"], "ports": ["*:22"]}]}'
    )
    assert policy.acls is not None
    assert policy.acls[0].src[0].name == "alice@"


def test_grants_subset() -> None:
    policy = parse_policy(
        '{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:22", "443", "*"]}]}'
    )
    assert policy.grants is not None
    assert [(r.protos, r.ports[0].first) for r in policy.grants[0].ip] == [
        ((6,), 22),
        ((), 443),
        ((), 0),
    ]
    policy = parse_policy(
        '{"grants": [{"src": ["*"], "dst": ["*"], "app": {"example.com/cap": [{}]}}]}'
    )
    assert policy.grants is not None
    assert policy.grants[0].app == {"example.com/cap": [{}]}
    err = refuse('{"grants": [{"src": ["*"], "dst": ["*"], "ip": []}]}')
    assert err.message == "ip and app can not both be empty"
    err = refuse('{"grants": [{"src": ["*"], "dst": ["autogroup:self"], "ip": ["*"]}]}')
    assert err.path == "grants[0].src[0]"
