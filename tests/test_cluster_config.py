"""The cluster-launcher configs (cluster.yaml for GPUs on a cloud, cluster-onprem.yaml for
machines over SSH) and the cluster's Serve config, checked by Ray's own validators: the
`prepare_config` + `validate_config` that `ray up` runs, and Serve's deploy schema. Broken
copies must fail them, or the passing ones prove nothing."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ["cluster.yaml", "cluster-onprem.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before it talks to any provider."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", CLUSTERS)
def test_cluster_configs_pass_ray_ups_validation(name):
    config = _ray_up_checks(_load(name))
    assert config["file_mounts"] == {"~/raylm": "."}  # this checkout is what the nodes install
    setup = " ".join(config["setup_commands"])
    assert ("pip install -q torch==2.13.0" in setup and "-e " in setup
            and "resolve_model_path" in setup)
    assert any("--metrics-export-port" in c for c in config["head_start_ray_commands"])


def test_the_gpu_cluster_has_an_engine_free_head_and_an_autoscaled_gpu_worker_type():
    config = _ray_up_checks(_load("cluster.yaml"))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head, worker = types[config["head_node_type"]], types["gpu_worker"]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    assert worker["node_config"]["InstanceType"].startswith("g5")
    assert 1 <= worker["min_workers"] < worker["max_workers"]
    # a CUDA torch build
    assert "download.pytorch.org/whl/cu" in " ".join(config["setup_commands"])


BROKEN = {
    "unknown key": lambda c: c.update(max_worker=3),
    "wrong type": lambda c: c.update(max_workers="four"),
    "ssh user not a string": lambda c: c["auth"].update(ssh_user=5),
}


@pytest.mark.parametrize("name", CLUSTERS)
@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_copies_fail_validation(name, breakage):
    config = _load(name)
    BROKEN[breakage](config)
    from jsonschema import ValidationError

    # the schema's error; the on-prem preparation compares max_workers before the schema runs
    with pytest.raises((ValidationError, TypeError)):
        _ray_up_checks(config)


def test_the_cluster_serve_config_passes_serves_schema_and_builds_gpu_tp_replicas():
    from ray.serve.schema import ServeDeploySchema

    from raylm.deployments.openai import ServeArgs

    config = _load("deployments/raylm-cluster.yaml")
    ServeDeploySchema.model_validate(config)
    args = ServeArgs(**config["applications"][0]["args"])
    placement = args.replica_placement()
    # one bundle for the replica, then one GPU per TP rank, all on one node
    assert placement["placement_group_bundles"][1:] == [{"CPU": 1.0, "GPU": 1}] * args.tp
    assert (placement["placement_group_strategy"] == "STRICT_PACK" and args.replica_count()
            == {"num_replicas": 4})
    with pytest.raises(ValueError, match="tpp"):  # a misspelled option is an error, not ignored
        ServeArgs(**{**config["applications"][0]["args"], "tpp": 2})
