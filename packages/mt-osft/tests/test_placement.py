"""Where OSFT's tensors live: W0 and the bases in host memory where the weights' shards wait
there (cpu_offload) or ``reference_on_host`` asks, and what the projections then work on."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from mt_osft.placement import compute_device, offloaded, staged, to_host


def sharded(local: torch.Tensor, device_type: str) -> DTensor:
    """``local`` as the one shard of a DTensor whose mesh says ``device_type``. A "cuda" mesh is
    built without a GPU (no backend is initialised for it), with its shard on the host: as an
    FSDP2 run on GPUs keeps its parameters under CPU offload."""
    mesh = DeviceMesh(device_type, [0], _init_backend=False)
    meta = TensorMeta(local.shape, local.stride(), local.dtype)
    return DTensor(local, DTensorSpec(mesh, (Shard(0),), meta), requires_grad=False)


def test_a_sharded_w0_stays_on_the_host_whatever_its_mesh_device(one_rank_group):
    """A DTensor's W0 keeps its mesh, placements and shape with its shard on the host. Made
    with DTensor.from_local, which moves a local tensor to its mesh's device type, every W0 went
    back to the GPU (13 GiB at 8B; here: no NVIDIA driver)."""
    weight = torch.randn(6, 4)
    original = sharded(weight, "cuda")
    host = to_host(original)
    assert isinstance(host, DTensor) and host.to_local().device.type == "cpu"
    assert host.device_mesh is original.device_mesh and host.placements == (Shard(0),)
    assert host.shape == weight.shape and torch.equal(host.to_local(), weight)


def test_host_shards_of_a_gpu_mesh_are_offloaded_and_project_on_the_gpu(one_rank_group):
    """Only a shard in host memory under a mesh that computes elsewhere counts as offloaded (its
    bases then join it in host memory: mt_osft.apply); its projections run on the mesh's device
    type, and everything else where it is."""
    on_gpu_mesh, on_cpu_mesh, plain = sharded(torch.ones(4, 2), "cuda"), sharded(
        torch.ones(4, 2), "cpu"), torch.ones(4, 2)  # fmt: skip
    assert [offloaded(t) for t in (on_gpu_mesh, on_cpu_mesh, plain)] == [True, False, False]
    assert [compute_device(t).type for t in (on_gpu_mesh, on_cpu_mesh, plain)] == [
        "cuda", "cpu", "cpu"
    ]  # fmt: skip


def test_staged_hands_out_each_targets_local_parts_in_order_where_they_are(one_rank_group):
    """On the device they live on, the parts are the tensors themselves (a projection writes
    into them in place), a DTensor's its local shard; no copy is made."""
    shards = [sharded(torch.full((2, 2), float(i)), "cpu") for i in range(3)]
    plains = [torch.full((3,), float(i)) for i in range(3)]
    seen = list(staged(range(3), lambda i: (shards[i], plains[i]), torch.device("cpu")))
    assert [i for i, _ in seen] == [0, 1, 2]
    for i, (shard_part, plain_part) in seen:
        assert shard_part.data_ptr() == shards[i].to_local().data_ptr() and plain_part is plains[i]
    assert list(staged([], lambda i: (), torch.device("cpu"))) == []
