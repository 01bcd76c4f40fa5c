"""Each viewer gets only the routes its policy lets it use (headscale's ReduceRoutes,
issue 12): a router's AllowedIPs and PrimaryRoutes differ per viewer, and a policy
change re-sends the router to whoever's share changed."""

from __future__ import annotations

from typing import Any

from appliance.changes import NodeOnline, PolicyChanged
from tests.appliance.test_tailnet_support import compose, connect, make_tailnet, node, user

USERS = [user(1, "alice"), user(2, "bob")]
R, A, B = 1, 2, 3  # R: alice's router for 10.1.0.0/24 and 10.2.0.0/24; A: alice's, B: bob's
ROUTES = ["10.1.0.0/24", "10.2.0.0/24"]
# alice may use both subnets, bob only 10.1.0.0/24; everyone may reach the router.
POLICY = """{
  "acls": [
    {"action": "accept", "src": ["alice@"], "dst": ["10.1.0.0/24:*", "10.2.0.0/24:*"]},
    {"action": "accept", "src": ["bob@"], "dst": ["10.1.0.0/24:*"]},
    {"action": "accept", "src": ["*"], "dst": ["alice@:*"]}
  ]
}"""
BOTH = POLICY.replace('"dst": ["10.1.0.0/24:*"]}', '"dst": ["10.1.0.0/24:*", "10.2.0.0/24:*"]}')


def router_as_seen_by(msg: dict[str, Any]) -> dict[str, Any]:
    peers = msg.get("Peers") or msg.get("PeersChanged") or []
    return next(p for p in peers if p["ID"] == R)


def setup(policy: str) -> Any:
    router = node(R, hostinfo={"Hostname": "r", "RoutableIPs": ROUTES}, approved_routes=ROUTES)
    return make_tailnet(USERS, [router, node(A), node(B, user_id=2)], policy)


def test_each_viewer_gets_its_share() -> None:
    tn = setup(POLICY)
    seen_a = router_as_seen_by(connect(tn, A)[1])
    seen_b = router_as_seen_by(connect(tn, B)[1])
    assert seen_a["PrimaryRoutes"] == ROUTES
    assert seen_b["PrimaryRoutes"] == ["10.1.0.0/24"]
    assert "10.2.0.0/24" in seen_a["AllowedIPs"]
    assert "10.2.0.0/24" not in seen_b["AllowedIPs"]
    assert "10.1.0.0/24" in seen_b["AllowedIPs"]


def test_policy_change_resends_the_router_to_whom_it_concerns() -> None:
    tn = setup(POLICY)
    ha, _ = connect(tn, A)
    hb, _ = connect(tn, B)
    tn.apply([PolicyChanged(BOTH)])
    msg_b = compose(tn, hb)
    assert msg_b is not None
    assert router_as_seen_by(msg_b)["PrimaryRoutes"] == ROUTES
    # alice's share did not change: no router for her.
    msg_a = compose(tn, ha)
    assert msg_a is None or not any(p["ID"] == R for p in (msg_a.get("PeersChanged") or []))
    # And back: bob loses 10.2.0.0/24 again.
    tn.apply([PolicyChanged(POLICY)])
    msg_b = compose(tn, hb)
    assert msg_b is not None
    assert router_as_seen_by(msg_b)["PrimaryRoutes"] == ["10.1.0.0/24"]


def test_no_policy_everyone_gets_every_route() -> None:
    tn = setup(None)  # type: ignore[arg-type]
    assert router_as_seen_by(connect(tn, B)[1])["PrimaryRoutes"] == ROUTES


def test_via_grant_steers_a_viewer_to_the_tagged_router() -> None:
    """Two routers serve 10.1.0.0/24; the first is the tailnet-wide primary. A via
    grant sends bob through the second: only in bob's map does it carry the route."""
    r1, r2 = 1, 4
    policy = """{
      "tagOwners": {"tag:one": ["alice@"], "tag:two": ["alice@"]},
      "grants": [
        {"src": ["alice@"], "dst": ["10.1.0.0/24"], "ip": ["*"]},
        {"src": ["bob@"], "dst": ["10.1.0.0/24"], "ip": ["*"], "via": ["tag:two"]},
        {"src": ["*"], "dst": ["tag:one", "tag:two"], "ip": ["*"]}
      ]
    }"""
    routes = ["10.1.0.0/24"]
    tn = make_tailnet(
        USERS,
        [
            node(
                r1,
                hostinfo={"Hostname": "r1", "RoutableIPs": routes},
                approved_routes=routes,
                tags=["tag:one"],
            ),
            node(
                r2,
                hostinfo={"Hostname": "r2", "RoutableIPs": routes},
                approved_routes=routes,
                tags=["tag:two"],
            ),
            node(A),
            node(B, user_id=2),
        ],
        policy,
    )

    def owners(msg: dict[str, Any]) -> dict[int, list[str]]:
        peers = msg.get("Peers") or []
        return {p["ID"]: p.get("PrimaryRoutes") or [] for p in peers if p["ID"] in (r1, r2)}

    assert owners(connect(tn, B)[1]) == {r1: [], r2: routes}
    assert owners(connect(tn, A)[1]) == {r1: routes, r2: []}
    seen_b = next(p for p in connect(tn, B)[1]["Peers"] if p["ID"] == r2)
    assert "10.1.0.0/24" in seen_b["AllowedIPs"]


def test_via_steering_fails_over_between_tagged_routers() -> None:
    """Two tag:two routers: bob goes through the first online; when it goes
    offline his map moves the route to the other one. Router 1 (no via tag)
    stays the tailnet-wide primary throughout, so nothing else moves."""
    r1, r2a, r2b = 1, 4, 5
    routes = ["10.1.0.0/24"]
    policy = """{
      "tagOwners": {"tag:one": ["alice@"], "tag:two": ["alice@"]},
      "grants": [
        {"src": ["bob@"], "dst": ["10.1.0.0/24"], "ip": ["*"], "via": ["tag:two"]},
        {"src": ["*"], "dst": ["tag:one", "tag:two"], "ip": ["*"]}
      ]
    }"""

    def router(i: int, tag: str) -> Any:
        info = {"Hostname": f"r{i}", "RoutableIPs": routes}
        return node(i, hostinfo=info, approved_routes=routes, tags=[tag])

    nodes = [router(r1, "tag:one"), router(r2a, "tag:two"), router(r2b, "tag:two")]
    tn = make_tailnet(USERS, [*nodes, node(A), node(B, user_id=2)], policy)
    tn.apply([NodeOnline(r1, True), NodeOnline(r2a, True), NodeOnline(r2b, True)])
    hb, first = connect(tn, B)
    seen = {p["ID"]: p.get("PrimaryRoutes") or [] for p in first["Peers"]}
    assert seen == {r1: [], r2a: routes, r2b: []}
    tn.apply([NodeOnline(r2a, False)])
    msg = compose(tn, hb)
    assert msg is not None
    changed = {p["ID"]: p.get("PrimaryRoutes") or [] for p in msg.get("PeersChanged") or []}
    assert changed.get(r2b) == routes, msg
