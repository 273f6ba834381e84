"""A 3-node ray.cluster_utils.Cluster on this machine, one shard pinned to each node by a custom
resource; a node is removed mid-training and a replacement with the same resource added: the shard
comes back from its checkpoint and the run ends bitwise equal to one process. Every socket the run
opened is on loopback."""
import ipaddress

import numpy as np
import pytest

from cembed.distributed import ShardedEmbedding

from netcheck import non_loopback, parse
from test_sharded import assert_same_state, single_process, zipf_batch

V, D, OPTS = 53, 4, {"lr": 0.02}


@pytest.fixture(scope="module")
def cluster(_ray_allowed):
    import ray
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)
    c = Cluster(initialize_head=True, head_node_args=dict(node, resources={"node0": 1}))
    workers = {k: c.add_node(**node, resources={f"node{k}": 1}) for k in (1, 2)}
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield ray, c, workers, node
    ray.shutdown()
    c.shutdown()


def test_node_removed_and_replaced(cluster, tmp_path):
    ray, c, workers, node = cluster
    pins = [{"resources": {f"node{k}": 0.01}} for k in range(3)]
    table = ShardedEmbedding(V, D, 3, "sparseadam", OPTS, seed=8, checkpoint_dir=str(tmp_path), checkpoint_every=4,
                             ray_options=pins, recovery_timeout=90, compiled_graph=True)
    emb, opt = single_process(V, D, "sparseadam", OPTS, 8)
    rng = np.random.default_rng(5)
    try:
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 3
        for step in range(1, 11):
            idx = zipf_batch(rng, V, 16)
            out = table(idx)
            assert out.tobytes() == emb(idx).tobytes()
            grad = rng.standard_normal(out.shape).astype(np.float32)
            table.backward(grad, step=True)
            emb.backward(grad, optimizer=opt)
            if step == 6:          # node 2 goes away (its shard with it); a new node with its resource joins
                c.remove_node(workers[2])
                workers[2] = c.add_node(**node, resources={"node2": 1})
        info = table.shard_info()
        assert info[2]["restored_from"] == 4 and info[0]["restored_from"] is None
        assert table.recoveries >= 1
        # the compiled graph spans the three nodes; it broke with the node and was built again
        assert table.graph_builds >= 2 and table.transport == "compiled graph", table.graph_error
        assert_same_state(table, emb, opt)
        bad, interfaces = non_loopback()
        assert interfaces == ["lo"]
        assert not bad, f"sockets off loopback: {bad}"
    finally:
        table.shutdown()


def test_loopback_check_sees_sockets_and_flags_others(cluster):
    """The check is real: it sees Ray's many sockets, and it flags an address that is not loopback."""
    from netcheck import sockets

    assert len(sockets()) >= 10
    table = ("  sl  local_address rem_address   st\n"
             "   0: 0100007F:1F90 0A00000A:0050 01\n"               # 127.0.0.1:8080 -> 10.0.0.10:80
             "   1: 00000000:0016 00000000:0000 0A\n")
    (l0, r0), (l1, r1) = parse(table)
    assert l0 == ipaddress.IPv4Address("127.0.0.1") and r0 == ipaddress.IPv4Address("10.0.0.10")
    from netcheck import is_local
    assert is_local(l0) and not is_local(r0) and is_local(l1) and is_local(r1)
