"""Fuzz target: a DERP map from derp.urls or a derp.paths JSON file (derp/derpmap.py).

The URL's server may be compromised or simply wrong; property: the regions
come out, or DerpConfigError names the problem.
"""

from __future__ import annotations

from hypothesis import strategies as st

from derp.derpmap import parse_derp_map_json
from derp.errors import DerpConfigError
from protocol.tailcfg import DERPMap
from tests.fuzz.harness import fuzz_tests
from tests.fuzz.strategies import dumps, json_scalars, json_values, mutated

GOOD = {
    "Regions": {
        "900": {
            "RegionID": 900,
            "RegionCode": "home",
            "RegionName": "Home",
            "Nodes": [
                {"Name": "900a", "RegionID": 900, "HostName": "derp.example", "DERPPort": 443}
            ],
        }
    }
}


def check(data: bytes) -> None:
    regions = parse_derp_map_json(data, "fuzz")
    # What we would hand to every client decodes as Go's tailcfg.DERPMap.
    DERPMap.from_json({"Regions": {str(k): v for k, v in regions.items() if v is not None}})


def _maps() -> st.SearchStrategy[bytes]:
    node_field = st.sampled_from(
        ["Name", "RegionID", "HostName", "IPv4", "IPv6", "STUNPort", "DERPPort", "STUNOnly"]
    )
    node = st.dictionaries(node_field, json_scalars(), max_size=6)
    region = st.fixed_dictionaries(
        {"RegionID": json_scalars(), "Nodes": st.one_of(st.lists(node, max_size=3), json_values(4))}
    )
    regions = st.dictionaries(
        st.one_of(st.sampled_from(["900", "1", "-1", "0", "x"]), st.text(max_size=4)),
        region,
        max_size=3,
    )
    return st.one_of(
        mutated(st.just(dumps(GOOD))),
        regions.map(lambda r: dumps({"Regions": r})),
        json_values().map(dumps),
    )


test_fuzz, test_corpus = fuzz_tests("derpmap", _maps(), check, expected=(DerpConfigError,))
