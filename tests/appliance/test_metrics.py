"""/metrics text: what only grows is exported as a counter, levels as gauges."""

from __future__ import annotations

from appliance.metrics import Metrics


def test_read_counters_are_counters_and_levels_are_gauges() -> None:
    accepts = [3]
    m = Metrics()
    m.counter("homescale_derp_accepts_total", lambda: accepts[0], "DERP clients accepted")
    m.gauge("homescale_derp_current_connections", lambda: 1)
    m.inc('homescale_isolated_errors_total{kind="change",cause="internal"}')
    accepts[0] = 5
    lines = m.render().splitlines()
    assert "# HELP homescale_derp_accepts_total DERP clients accepted" in lines
    assert "# TYPE homescale_derp_accepts_total counter" in lines
    assert "homescale_derp_accepts_total 5" in lines  # read at scrape time
    assert "# TYPE homescale_derp_current_connections gauge" in lines
    assert "# TYPE homescale_isolated_errors_total counter" in lines
