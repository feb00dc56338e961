import numpy as np
import pytest

from opentsu.fabric import PRESETS, FabricConfig, FabricGeometry, VirtualGeometry
from opentsu.topology import Grid, SparseGraph, TopologyError

CONFIGS = [PRESETS["icebreaker"], PRESETS["hx8k"], PRESETS["icestick"],
           FabricConfig(16, 16, ((0, 1), (2, 1)), lanes=8, layers=8),
           FabricConfig(8, 8, ((0, 1),), lanes=2), FabricConfig(8, 8, ((0, 1), (2, 1)), lanes=2, latency=2),
           FabricConfig(4, 4, ((0, 1),), lanes=2, latency=1), FabricConfig(32, 32, ((0, 1), (2, 1)), lanes=8),
           FabricConfig(8, 8, ((0, 1), (1, 1)), lanes=4, latency=2), FabricConfig(12, 8, ((0, 1),), lanes=4)]


@pytest.fixture(params=CONFIGS, ids=lambda c: f"{c.rows}x{c.cols}-{len(c.jumps)}j-{c.lanes}l")
def geometry(request):
    return FabricGeometry(request.param)


def test_every_node_updated_once_per_sweep(geometry):
    nodes = geometry.schedule[geometry.schedule >= 0]
    assert sorted(nodes.tolist()) == list(range(geometry.n))


def test_simultaneous_updates_are_independent(geometry):
    nbr = geometry.neighbours
    for row in geometry.schedule:
        active = set(row[row >= 0].tolist())
        for node in active:
            assert not active & set(nbr[node].tolist())


def test_no_update_reads_a_value_still_in_the_pipeline(geometry):
    cyc, nbr, latency = geometry.update_cycle, geometry.neighbours, geometry.latency
    for i in range(geometry.n):
        for j in nbr[i]:
            if j >= 0:
                assert (cyc[j] - cyc[i]) % geometry.cycles >= latency


def test_stations_are_fixed_wires(geometry):
    # The node a lane updates is always the one passing its station; the frame returns every sweep.
    for tau in range(geometry.cycles):
        for lane in range(geometry.lanes):
            node = geometry.schedule[tau, lane]
            sel = geometry.station_select[tau, lane]
            assert (node < 0) == (sel < 0)
            if node >= 0:
                assert geometry.node_at(geometry.lane_stations[lane][sel], tau) == node
    v = geometry.v
    assert (geometry.cycles * v[0]) % geometry.rows == 0 and (geometry.cycles * v[1]) % geometry.cols == 0


def test_capture_reads_each_final_value_once(geometry):
    cap, cyc, C = geometry.capture_schedule, geometry.update_cycle, geometry.cycles
    seen = cap[cap >= 0]
    assert sorted(seen.tolist()) == list(range(geometry.n))
    for tau in range(C):
        for lane in range(geometry.lanes):
            node = cap[tau, lane]
            if node < 0:
                continue
            # Read at least `latency` cycles after its update in this sweep, before its next update.
            since = (tau - cyc[node]) % C
            assert since >= geometry.latency
            assert tau < cyc[node] or tau - cyc[node] >= geometry.latency


def test_reference_layer_runs_eight_updates_per_cycle():
    g = FabricGeometry(FabricConfig(16, 16, ((0, 1), (2, 1)), lanes=8, layers=8))
    assert g.cycles == 32 and g.updates_per_cycle == 8 and g.hazard_slack() >= 3
    assert max(len(s) for s in g.lane_stations) == 2


def test_impossible_configurations_are_refused():
    with pytest.raises(TopologyError, match="above the fabric maximum"):
        FabricGeometry(FabricConfig(16, 16, ((0, 1), (2, 1), (3, 1)), lanes=8))
    with pytest.raises(ValueError, match="cycles between dependent updates"):
        FabricGeometry(FabricConfig(4, 4, ((0, 1),), lanes=2, latency=3))
    with pytest.raises(ValueError):
        FabricConfig(16, 16, ((0, 1),), lanes=0)


def test_virtual_geometry_for_general_graphs():
    rng = np.random.default_rng(5)
    mask = np.triu(rng.random((30, 30)) < 0.2, 1)
    graph = SparseGraph.from_adjacency(mask | mask.T)
    g = VirtualGeometry(graph, lanes=4)
    assert sorted(g.schedule[g.schedule >= 0].tolist()) == list(range(30))
    for row in g.schedule:
        active = set(row[row >= 0].tolist())
        for node in active:
            assert not active & set(graph.neighbours[node].tolist())
